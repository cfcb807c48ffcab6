"""The crystallization gate: a transformers callback that stops SFT once token accuracy crystallizes (the
reference's phase-transition detector), with `carl_assets.carl.coherence`'s GATE_* defaults. No Dagster
import here."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from carl_assets.carl.coherence import GATE_MIN_ABOVE, GATE_THRESHOLD, GATE_WINDOW


class PhaseTransitionGate(TrainerCallback):
    """Detects crystallization during training and stops it.

    Fires once, when ``min_above`` of the last ``window`` logged ``mean_token_accuracy`` values reach
    ``threshold`` (default: 3 of the last 5 at >= 0.99), which is robust to single-batch noise. It then
    sets ``control.should_training_stop``. Logs without ``mean_token_accuracy`` (evaluation logs, the
    final summary) are skipped — the reference counted them as accuracy 0. The peak of the logged
    ``entropy`` (whenever present) and its step are tracked too. TRL's SFT averages the accuracy over
    ``logging_steps``, so use ``logging_steps=1``.

    Attributes after training: ``triggered``, ``trigger_step`` (-1 if not), ``window_values`` (the
    window at the trigger), ``peak_entropy``, ``peak_entropy_step``, ``history`` (one dict per log
    with the accuracy: step, mean_token_accuracy, entropy).
    """

    def __init__(
        self, threshold: float = GATE_THRESHOLD, window: int = GATE_WINDOW, min_above: int = GATE_MIN_ABOVE
    ) -> None:
        if window < 1 or not 1 <= min_above <= window:
            raise ValueError(f"need 1 <= min_above <= window, got min_above={min_above}, window={window}")
        self.threshold = threshold
        self.window = window
        self.min_above = min_above
        self._recent: list[float] = []
        self.triggered = False
        self.trigger_step = -1
        self.window_values: list[float] = []
        self.peak_entropy = 0.0
        self.peak_entropy_step = -1
        self.history: list[dict[str, Any]] = []

    def check(self, value: float, entropy: float | None = None, step: int = 0) -> bool:
        """Record one accuracy value (and entropy); True exactly once, at the step the gate fires."""
        self.track_entropy(entropy, step)
        self._recent.append(float(value))
        if len(self._recent) > self.window:
            self._recent.pop(0)
        if self.triggered or len(self._recent) < self.min_above:
            return False
        if sum(1 for v in self._recent if v >= self.threshold) >= self.min_above:
            self.triggered = True
            self.trigger_step = step
            self.window_values = list(self._recent)
            return True
        return False

    def track_entropy(self, entropy: float | None, step: int) -> None:
        if entropy is not None and entropy > self.peak_entropy:
            self.peak_entropy = float(entropy)
            self.peak_entropy_step = step

    def _observe(self, logs: dict[str, Any], step: int) -> bool:
        """One log record; True when it makes the gate fire."""
        entropy = logs.get("entropy")
        if "mean_token_accuracy" not in logs:
            self.track_entropy(entropy, step)
            return False
        accuracy = float(logs["mean_token_accuracy"])
        self.history.append(
            {
                "step": step,
                "mean_token_accuracy": accuracy,
                "entropy": None if entropy is None else float(entropy),
            }
        )
        return self.check(accuracy, entropy, step)

    def restore(self, log_history: list[dict[str, Any]]) -> None:
        """Start over and replay a run's logged records (`TrainerState.log_history`): after a resume from a
        trainer checkpoint the window, the trigger and the entropy peak are what the uninterrupted run had
        at that step, so the gate fires at the same step. Records without a step (the final summary) are
        skipped."""
        self._recent, self.history, self.window_values = [], [], []
        self.triggered, self.trigger_step = False, -1
        self.peak_entropy, self.peak_entropy_step = 0.0, -1
        for record in log_history:
            if "step" in record and "train_runtime" not in record:
                self._observe(record, int(record["step"]))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # A resumed run starts at the checkpoint's step with its log history loaded: rebuild from it. A
        # fresh run (step 0) leaves the gate as it is.
        if int(getattr(state, "global_step", 0) or 0) > 0:
            self.restore(list(getattr(state, "log_history", None) or []))
            if self.triggered:
                control.should_training_stop = True
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        if not logs:
            return control
        if self._observe(logs, int(getattr(state, "global_step", 0))):
            control.should_training_stop = True
        return control

    def summary(self) -> dict[str, Any]:
        """One record of the run's gate: for a `crystallization_events` row."""
        return {
            "triggered": self.triggered,
            "trigger_step": self.trigger_step,
            "window_values": list(self.window_values),
            "peak_entropy": self.peak_entropy,
            "peak_entropy_step": self.peak_entropy_step,
            "threshold": self.threshold,
            "window": self.window,
            "min_above": self.min_above,
        }
