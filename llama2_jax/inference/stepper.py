"""What the scheduler drives (a Stepper: the Slots, or lockstep's Leader) and which of its calls
every process of a multi-process server replays. Plain Python: imported without JAX."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from llama2_jax.inference.params import SamplingParams

if TYPE_CHECKING:
    from llama2_jax.inference.step_io import Prefix, PromptScores, StepOut


class Stepper(Protocol):
    """What the scheduler drives: the Slots (llama2_jax.inference.slots), or lockstep's
    Leader, which replays each call of REPLAYED on every process first."""

    max_slots: int
    length: int
    chunk: int
    compile_count: int
    max_adapters: int

    def prefill(self, slot: int, tokens: Sequence[int], start: int, final: bool,
                params: SamplingParams, allowed=None) -> "StepOut": ...
    def prefill_scored(self, slot: int, tokens: Sequence[int], start: int, final: bool,
                       params: SamplingParams, following: int, allowed=None
                       ) -> "tuple[StepOut, PromptScores]": ...
    def decode(self, allowed=None) -> "StepOut": ...
    def release(self, slot: int) -> None: ...
    def resume(self, slot: int, length: int) -> None: ...
    def extract(self, slot: int, length: int) -> "Prefix": ...
    def insert(self, slot: int, prefix: "Prefix") -> None: ...
    def warm_up(self) -> int: ...
    def prefix_bytes(self, length: int) -> int: ...
    def set_adapter(self, slot: int, index: int) -> None: ...
    def load_adapter(self, index: int, directory: str) -> None: ...


# The calls that change device or host state, which every process must make in order.
REPLAYED = ("prefill", "prefill_scored", "decode", "release", "resume", "extract", "insert",
            "warm_up", "set_adapter", "load_adapter")
