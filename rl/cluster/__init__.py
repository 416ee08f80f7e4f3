"""Where things run: Ray start-up, placement groups, the learner and rollout groups as one
object each, calls with deadlines, who holds a GPU the learner and the engines share."""
