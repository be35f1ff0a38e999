"""The rank side: the rank's process entry, its context (identity, partition, report) and callbacks."""
