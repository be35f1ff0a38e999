"""What one rank does with its partition: inputs -> model -> fit -> report."""
