"""Per-request sampling parameters, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # each stop string is searched for in every step's new text
# Below this a positive temperature is treated as 0 (greedy): logits / 1e-38 overflow fp32, and
# sampling at 1e-5 already picks the top token unless two logits tie to within ~1e-4.
MIN_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS_ENTRIES = 300  # as OpenAI


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = whole vocabulary
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    grammar: str | None = None  # llguidance grammar the output must match (response_format, tool calls)
    # the grammar starts at this token, before which the output is free (tool_choice "auto": [TOOL_CALLS])
    grammar_trigger: int | None = None
    banned_token_ids: list[int] = field(default_factory=list)  # never sampled (tool_choice "none": [TOOL_CALLS])

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"),
            (all(len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"a stop string may have at most {MAX_STOP_CHARS} characters"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
             f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}"),
            (all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()),
             "logit_bias maps token ids (non-negative integers) to values in [-100, 100]"),
            (self.grammar_trigger is None or self.grammar is not None, "grammar_trigger needs a grammar"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.top_logprobs:
            self.logprobs = True
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
