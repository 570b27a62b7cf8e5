"""A train-step plugin for tests: the loss of one chosen global batch is NaN."""
from framework.models.gpt.step import GPTTrainStep


class NanAtStep(GPTTrainStep):
    """GPTTrainStep whose loss is NaN on global batch `at` (1-based; one micro-batch per step)."""

    def __init__(self, device, at: int):
        super().__init__(device)
        self.at, self.calls = at, 0

    def forward_step(self, data_iterator, model):
        self.calls += 1
        output, loss_fn = super().forward_step(data_iterator, model)
        if self.calls != self.at:
            return output, loss_fn

        def poisoned(out):
            loss, logs = loss_fn(out)
            return loss * float("nan"), {k: v * float("nan") for k, v in logs.items()}

        return output, poisoned
