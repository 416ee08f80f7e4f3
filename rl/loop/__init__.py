"""The run: the trainer's step loop, where the policy starts (the cold start), checkpoints,
tracking, the queue of rollouts started ahead, stop signals."""
