-- Images with content (issue 4): the kind (machine, kernel, ramdisk), the kernel and
-- ramdisk a machine image boots with, and the bytes' content address and size in the
-- CLC's image store. Images registered before have no content (sha256 NULL): simulated
-- nodes launch them, real ones cannot. A deregistered image keeps its row (state
-- 'deregistered') while instances launched from it still need its bytes.
ALTER TABLE images ADD COLUMN image_type TEXT NOT NULL DEFAULT 'machine';
ALTER TABLE images ADD COLUMN kernel_id TEXT;
ALTER TABLE images ADD COLUMN ramdisk_id TEXT;
ALTER TABLE images ADD COLUMN sha256 TEXT;
ALTER TABLE images ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN disk_format TEXT;

-- The kernel and ramdisk an instance boots with (from RunInstances or its image).
ALTER TABLE instances ADD COLUMN kernel_id TEXT;
ALTER TABLE instances ADD COLUMN ramdisk_id TEXT;
