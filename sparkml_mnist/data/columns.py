"""Column names shared by the data stage (Spark side) and the training side (Arrow/numpy in the ranks)."""

ROW_COLUMN = "row"  # each image's 0-based position in its file
LABEL_COLUMN = "label"
SHARD_COLUMN = "shard"  # hand-off frame: which rank's shard a row belongs to
VALIDATION_COLUMN = "validation"  # hand-off frame: the row is in the validation split
PIXELS_COLUMN = "pixels"  # hand-off frame: the image's 784 raw pixel values
LAYOUT_COLUMN = "layout"  # hand-off of several layouts at once: which one a row belongs to
# The test set's rows in the hand-off frame: no validation split's layout (those count from 0).
TEST_LAYOUT = -1
