-- RunInstances answers with its reservation's instances, and purging a reservation checks
-- that no instance refers to it: both look instances up by reservation.
CREATE INDEX instances_reservation ON instances(reservation_id);
