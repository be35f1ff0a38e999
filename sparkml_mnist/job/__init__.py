"""The driver's job: plan -> run every variant -> evaluate -> track, with state to resume from."""
