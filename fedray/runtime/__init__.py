"""Runtime: server and client actors, cluster placement, the driver."""
