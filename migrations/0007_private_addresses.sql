-- Private addresses (issue 5): each instance's address in its zone's subnet. The zone's CC
-- hands it out when it places the instance and reports it with the instance's state; it
-- comes back to the CC in the desired state, so a restarted CC keeps it.
ALTER TABLE instances ADD COLUMN private_ip TEXT;
