"""Training stages: each builds a :class:`trainer.loop.Task` over the shared machinery."""
