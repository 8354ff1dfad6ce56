"""One module per technique; each declares its arguments, state slots, stage and tensor code."""
