-- Private addresses (issue 5): each instance's address in its zone's subnet. The zone's CC
-- hands it out when it places the instance and reports it with the instance's state; it
-- comes back to the CC in the desired state, so a restarted CC keeps it.
ALTER TABLE instances ADD COLUMN private_ip TEXT;

-- The instance metadata service's options (RunInstances' MetadataOptions): whether IMDSv2
-- session tokens are required, and whether the service answers at all.
ALTER TABLE instances ADD COLUMN metadata_http_tokens TEXT NOT NULL DEFAULT 'optional';
ALTER TABLE instances ADD COLUMN metadata_http_endpoint TEXT NOT NULL DEFAULT 'enabled';
