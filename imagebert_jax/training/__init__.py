"""Training: the stages and their loop, the train state and jitted step, the optimiser,
checkpoints, metric writers, health alarms, and starting weights from a BERT checkpoint."""
