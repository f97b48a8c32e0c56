"""Training machinery: the trainer loop, checkpoints and logging. Puts data, model and solver together."""
