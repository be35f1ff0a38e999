"""The data stage: LIBSVM files on Spark -> validated DataFrames -> evenly sharded tensors."""
