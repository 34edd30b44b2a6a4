-- Security groups (issue 5): stored and shown exactly as EC2 does; enforcing them on the
-- nodes' network comes with networking. One rule per source, as EC2 keeps them
-- (DescribeSecurityGroups folds them back into IpPermissions).
CREATE TABLE security_groups (
    group_id    TEXT PRIMARY KEY NOT NULL,
    account_id  TEXT NOT NULL REFERENCES accounts(account_id),
    group_name  TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (account_id, group_name)
) STRICT;

CREATE TABLE security_group_rules (
    rule_id             TEXT PRIMARY KEY NOT NULL,
    group_id            TEXT NOT NULL REFERENCES security_groups(group_id),
    account_id          TEXT NOT NULL,
    is_egress           INTEGER NOT NULL,
    -- 'tcp', 'udp', 'icmp', 'icmpv6', '-1' (all) or another IP protocol number.
    protocol            TEXT NOT NULL,
    -- Ports for tcp/udp, type and code for icmp; NULL where the protocol has none.
    from_port           INTEGER,
    to_port             INTEGER,
    -- Exactly one source (ingress) or destination (egress).
    cidr_ipv4           TEXT,
    cidr_ipv6           TEXT,
    referenced_group_id TEXT,
    description         TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX security_group_rules_group ON security_group_rules(group_id);
CREATE INDEX security_group_rules_referenced ON security_group_rules(referenced_group_id);

-- The groups an instance was launched with, in the order given.
CREATE TABLE instance_security_groups (
    instance_id TEXT NOT NULL,
    group_id    TEXT NOT NULL,
    position    INTEGER NOT NULL,
    PRIMARY KEY (instance_id, group_id)
) STRICT;
CREATE INDEX instance_security_groups_group ON instance_security_groups(group_id);

-- Every account has a `default` group, with EC2's default rules: all traffic from members
-- of the group itself in, all traffic out. Its id (and its rules' ids) derive from the
-- account number, so that every replica makes the same ones; state::apply makes them the
-- same way for accounts created later.
INSERT INTO security_groups(group_id, account_id, group_name, description, created_at)
SELECT printf('sg-%017x', CAST(account_id AS INTEGER)), account_id, 'default',
       'default VPC security group', created_at
FROM accounts;
INSERT INTO security_group_rules(rule_id, group_id, account_id, is_egress, protocol, cidr_ipv4,
                                 referenced_group_id)
SELECT printf('sgr-%017x', CAST(account_id AS INTEGER) * 2),
       printf('sg-%017x', CAST(account_id AS INTEGER)), account_id, 0, '-1', NULL,
       printf('sg-%017x', CAST(account_id AS INTEGER))
FROM accounts
UNION ALL
SELECT printf('sgr-%017x', CAST(account_id AS INTEGER) * 2 + 1),
       printf('sg-%017x', CAST(account_id AS INTEGER)), account_id, 1, '-1', '0.0.0.0/0', NULL
FROM accounts;
