"""An action-head policy (VLA style): the VLM reads the observation once, small heads give the action and value.

Data flow of one step (``act``)::

    {"image", "text"} + LanguageSpec --vla_prompt + chat template--> prompt string
    prompt + image --processor--> model inputs --one forward pass (no generation)--> hidden states
    last prompt token's last-layer hidden state --action head--> Gaussian (continuous) | categorical (discrete)
                                                --value head--> value

The backbone is a :class:`~agents.policy.VLMPolicy` (any supported family, LoRA or full weights, its value
head included), so the prompt's chat template, the image processing and the saved layout are the text
policy's. The action head reads the **last prompt token's** last-layer hidden state: in a causal language
model it is the one position that attends to every image and text token of the prompt, it is what the
value head already reads (RL4VLM), and it costs no extra pass. A mean over positions would mix in padding
(left padding varies with the batch) and the many image tokens that have not seen the task text.

**Continuous actions** (Reach's and Push's ``continuous_action_space``): a diagonal Gaussian over a
pre-squash ``u``; the action is ``loc + scale * tanh(u)`` with ``loc, scale`` the centre and half-width of
the space's bounds, so every sample is inside them. Its log-prob is the change of variables
``log N(u; mean, std) - sum log(scale * (1 - tanh(u)**2))`` (as torch's ``TransformedDistribution`` with
``TanhTransform`` and ``AffineTransform``; tested against it). The log-std is a learned vector
(``state_dependent_std=False``) or a second output of the head, clamped to ``[LOG_STD_MIN, LOG_STD_MAX]``.
A tanh-squashed Gaussian has no closed-form entropy: :meth:`ActionHead.log_prob` reports the pre-squash
Gaussian's (for logging and an entropy bonus). A given action on the bounds (an expert's clipped move) is
moved ``SQUASH_EPS`` inside them before ``atanh``. Greedy acting takes ``tanh(mean)``.

**Discrete actions**: a categorical over the env's action names (any registered env with a language
spec); greedy acting takes the argmax.

Acting is one forward pass per batch (``logits_to_keep=1``: the language-model head runs for one position
only), against the text policy's prompt pass plus one pass per generated token.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from agents.models import seeded
from agents.policy import PolicyConfig, VLMPolicy, split_observations, text_positions
from envs.language import LanguageSpec

VLA_FILE = "vla.json"
HEAD_FILE = "action_head.safetensors"
ACTION_TYPES = ("continuous", "discrete")
#: A given action on the bounds (atanh(+-1) is infinite) is moved this far inside them (in units of the
#: half-width): atanh(0.999) = 3.8, well within what the head's mean reaches.
SQUASH_EPS = 1e-3
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class HeadConfig:
    """The action head's options; the action space's fields are filled from the environment
    (:func:`head_config_for`)."""

    action_type: Literal["continuous", "discrete"] = "continuous"
    """``continuous``: a tanh-squashed Gaussian over the env's ``continuous_action_space``; ``discrete``: a
    categorical over its action names."""
    hidden_sizes: tuple[int, ...] = (256,)
    """Hidden layer sizes of the action head's MLP (ReLU)."""
    log_std_init: float = -0.5
    """Initial log standard deviation of the Gaussian (pre-squash)."""
    state_dependent_std: bool = False
    """The head outputs the log-std from the hidden state (else one learned vector)."""
    action_names: tuple[str, ...] = ()
    """The env's action names (the discrete head's categories)."""
    action_low: tuple[float, ...] = ()
    """Lower bounds of the continuous action space."""
    action_high: tuple[float, ...] = ()
    """Upper bounds of the continuous action space."""

    def __post_init__(self) -> None:
        if self.action_type not in ACTION_TYPES:
            raise ValueError(f"action_type must be one of {ACTION_TYPES}, got {self.action_type!r}.")
        self.hidden_sizes = tuple(self.hidden_sizes)
        self.action_names = tuple(self.action_names)
        self.action_low, self.action_high = tuple(self.action_low), tuple(self.action_high)
        if self.action_type == "continuous":
            if not self.action_low or len(self.action_low) != len(self.action_high):
                raise ValueError("A continuous head needs the action space's bounds (action_low, action_high).")
            if not all(
                math.isfinite(lo) and math.isfinite(hi) and lo < hi for lo, hi in zip(self.action_low, self.action_high)
            ):
                raise ValueError(
                    f"A continuous head needs finite bounds low < high, got {self.action_low} .. {self.action_high}."
                )
        elif len(self.action_names) < 2:
            raise ValueError(f"A discrete head needs at least 2 action names, got {self.action_names}.")

    @property
    def action_dim(self) -> int:
        return len(self.action_low) if self.action_type == "continuous" else len(self.action_names)


def head_config_for(env_id: str, env_kwargs: dict[str, Any] | None, action_type: str, **options: Any) -> HeadConfig:
    """The head's config for an env: its action names and, for a continuous head, its
    ``continuous_action_space`` bounds; a ``ValueError`` that says what to change when the env has none."""
    import gymnasium as gym

    import envs

    spec = envs.get_language(env_id)
    if action_type not in ACTION_TYPES:
        raise ValueError(f"action head {action_type!r}: use one of {ACTION_TYPES}.")
    if action_type == "discrete":
        return HeadConfig(action_type="discrete", action_names=spec.action_names, **options)
    env = gym.make(env_id, **(env_kwargs or {}))
    try:
        space = getattr(env.unwrapped, "continuous_action_space", None)
        has_step = callable(getattr(env.unwrapped, "step_continuous", None))
    finally:
        env.close()
    if space is None or not has_step:
        raise ValueError(
            f"{env_id} has no continuous action space (env.unwrapped.continuous_action_space and step_continuous), "
            "so a continuous action head cannot act in it: use --action-head discrete (a categorical over its "
            f"actions {spec.action_names})."
        )
    return HeadConfig(
        action_type="continuous",
        action_names=spec.action_names,
        action_low=tuple(float(x) for x in np.ravel(space.low)),
        action_high=tuple(float(x) for x in np.ravel(space.high)),
        **options,
    )


class ActionHead(nn.Module):
    """MLP from the backbone's hidden state to the parameters of the action distribution (float32)."""

    def __init__(self, input_size: int, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        size = input_size
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        self.trunk = nn.Sequential(*layers)
        dim = config.action_dim
        continuous = config.action_type == "continuous"
        self.out = nn.Linear(size, 2 * dim if continuous and config.state_dependent_std else dim)
        if continuous:
            # Small initial means: the first actions are near the centre of the space, not saturated.
            nn.init.normal_(self.out.weight, std=0.01)
            nn.init.zeros_(self.out.bias)
            if config.state_dependent_std:
                with torch.no_grad():
                    self.out.bias[dim:] = config.log_std_init
            else:
                self.log_std = nn.Parameter(torch.full((dim,), float(config.log_std_init)))
            low, high = torch.tensor(config.action_low), torch.tensor(config.action_high)
            self.register_buffer("loc", (high + low) / 2, persistent=False)
            self.register_buffer("scale", (high - low) / 2, persistent=False)

    @property
    def continuous(self) -> bool:
        return self.config.action_type == "continuous"

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mean, log_std)`` of the pre-squash Gaussian, or ``(logits, None)``."""
        output = self.out(self.trunk(features.float()))
        if not self.continuous:
            return output, None
        dim = self.config.action_dim
        if self.config.state_dependent_std:
            mean, log_std = output[..., :dim], output[..., dim:]
        else:
            mean, log_std = output, self.log_std.expand_as(output)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    # -- the distribution ---------------------------------------------------------------------------------
    def squash(self, raw: torch.Tensor) -> torch.Tensor:
        """The env action of a pre-squash sample: ``loc + scale * tanh(raw)``."""
        return self.loc + self.scale * torch.tanh(raw)

    def unsquash(self, action: torch.Tensor) -> torch.Tensor:
        """The pre-squash value of an env action (moved ``SQUASH_EPS`` inside the bounds first)."""
        unit = ((action.float() - self.loc) / self.scale).clamp(-1 + SQUASH_EPS, 1 - SQUASH_EPS)
        return torch.atanh(unit)

    def log_prob(self, features: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-prob, entropy)`` per row of pre-squash samples ``raw`` (continuous, ``(B, dim)``) or action
        indices (discrete, ``(B,)``). The continuous log-prob is that of the squashed action
        ``squash(raw)``; the entropy is the pre-squash Gaussian's (see the module docstring)."""
        params, log_std = self(features)
        if not self.continuous:
            logprobs = torch.log_softmax(params, -1)
            chosen = logprobs.gather(-1, raw.long().unsqueeze(-1)).squeeze(-1)
            return chosen, -(logprobs.exp() * logprobs).sum(-1)
        raw = raw.float()
        gaussian = -0.5 * ((raw - params) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        # log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)), stable for large |u| (as SAC implementations).
        log_det = 2 * (math.log(2) - raw - nn.functional.softplus(-2 * raw)) + torch.log(self.scale)
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)
        return (gaussian - log_det).sum(-1), entropy

    def action_log_prob(self, features: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`log_prob` of env actions (an expert's): continuous ones are unsquashed first."""
        return self.log_prob(features, self.unsquash(actions) if self.continuous else actions)

    def sample(self, features: torch.Tensor, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw, action)``: a pre-squash sample and its env action (continuous), or the index twice."""
        params, log_std = self(features)
        if not self.continuous:
            index = params.argmax(-1) if greedy else torch.multinomial(torch.softmax(params, -1), 1).squeeze(-1)
            return index, index
        raw = params if greedy else params + log_std.exp() * torch.randn_like(params)
        return raw, self.squash(raw)


@dataclass
class HeadAction:
    """One action of an action-head policy, shaped like a :class:`~agents.policy.Completion` where the env
    runner reads one (``action``, ``text``, ``reason``, ``response_ids``, ``value``...)."""

    action: int | np.ndarray
    """The env action: an index (discrete) or a float32 vector inside the bounds (continuous)."""
    raw: torch.Tensor
    """The pre-squash sample (continuous) or the index (discrete): what :meth:`ActionHead.log_prob` scores."""
    features: torch.Tensor
    """The backbone's hidden state the heads read (float32, CPU): a frozen-backbone update reuses it."""
    logprob: float
    entropy: float
    value: float
    action_names: tuple[str, ...]
    text: str
    """The action written out: its name (discrete) or the vector (continuous), for logs and samples."""
    reason: str | None = None
    response_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """No tokens are generated (kept so the env runner counts 0 generated tokens)."""

    @property
    def valid(self) -> bool:
        return True


def vla_prompt(spec: LanguageSpec, step_text: str) -> str:
    """The text part of an action-head policy's prompt: the task and the step text (no answer format: the
    head, not the text, gives the action).

    >>> print(vla_prompt(LanguageSpec("Reach the ball.", ("left", "right")), "Step 1 of 50."))
    Reach the ball.
    Step 1 of 50.
    """
    lines = [spec.instruction.strip()]
    if step_text.strip():
        lines.append(step_text.strip())
    return "\n".join(lines)


class VLAPolicy(nn.Module):
    """A VLM backbone with an action head and a value head. Build it with :func:`build_vla_policy` or load one
    with :func:`agents.policy.load_policy` (a saved directory holds ``vla.json``)."""

    def __init__(self, backbone: VLMPolicy, head_config: HeadConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_config = head_config
        hidden_size = backbone.model.config.get_text_config().hidden_size
        with seeded(backbone.config.init_seed + 1):
            self.head = ActionHead(hidden_size, head_config).to(backbone.device)
        # What "the backbone" trains when a stage trains it: the LoRA adapters, or the language model's
        # weights under full fine-tuning (as load_policy set them), never the value head.
        self.backbone_parameters = [p for p in backbone.model.parameters() if p.requires_grad]

    @property
    def config(self) -> PolicyConfig:
        """The backbone's options (the env runner reads ``prompt_style`` from it; thoughts are never checked)."""
        return self.backbone.config

    @property
    def continuous(self) -> bool:
        return self.head.continuous

    @property
    def value_head(self) -> nn.Module:
        return self.backbone.value_head

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def prompt_text(self, spec: LanguageSpec, step_text: str) -> str:
        """The full prompt string for one observation (the backbone's chat template around :func:`vla_prompt`)."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vla_prompt(spec, step_text)}]}
        ]
        return self.backbone.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=self.backbone.chat_template
        )

    def features(self, observations: Any, spec: LanguageSpec) -> torch.Tensor:
        """The last prompt token's last-layer hidden state, ``(B, hidden)`` float32, from one forward pass
        (with gradients when they are enabled: call it under ``torch.no_grad()`` for a frozen backbone)."""
        backbone = self.backbone
        images, texts = split_observations(observations)
        inputs = backbone.encode([self.prompt_text(spec, text) for text in texts], images)
        if backbone.family.rope_from_attention_mask:
            inputs["position_ids"] = text_positions(inputs["attention_mask"])
        # Dropout is off (load_policy); training mode only switches gradient checkpointing on.
        backbone.model.train(backbone.config.gradient_checkpointing and torch.is_grad_enabled())
        backbone._capture = "prefill"  # the hook keeps hidden[:, -1]: the last prompt token (left padding)
        try:
            backbone.model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            backbone._capture = None
        return backbone._hidden.float()

    @torch.no_grad()
    def act(self, observations: Any, spec: LanguageSpec | list[LanguageSpec], greedy: bool = False) -> list[HeadAction]:
        """Actions for a batch of observations from one forward pass (no generation)."""
        if isinstance(spec, list):
            if len({s.action_names for s in spec}) != 1:
                raise ValueError("An action-head policy acts in one env: every observation needs the same spec.")
            spec = spec[0]
        features = self.features(observations, spec)
        raw, actions = self.head.sample(features, greedy)
        logprob, entropy = self.head.log_prob(features, raw)
        values = self.value_head(features)
        result = []
        for row in range(len(features)):
            if self.continuous:
                action: int | np.ndarray = actions[row].cpu().numpy().astype(np.float32)
                text = "[" + ", ".join(f"{x:+.3f}" for x in action) + "]"
            else:
                action = int(actions[row])
                text = self.head_config.action_names[action]
            result.append(
                HeadAction(
                    action=action,
                    raw=raw[row].cpu(),
                    features=features[row].cpu(),
                    logprob=float(logprob[row]),
                    entropy=float(entropy[row]),
                    value=float(values[row]),
                    action_names=spec.action_names,
                    text=text,
                )
            )
        return result

    @torch.no_grad()
    def values(self, observations: Any, spec: LanguageSpec | list[LanguageSpec]) -> torch.Tensor:
        """Value estimates (one forward pass), e.g. to bootstrap a truncated episode."""
        spec = spec[0] if isinstance(spec, list) else spec
        return self.value_head(self.features(observations, spec)).cpu()

    def save(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The backbone as :meth:`VLMPolicy.save` writes it (adapter or weights, value head, options), plus
        the action head's weights and options. ``state_dict``: this policy's whole state dict, when the
        process holds only a shard of it (as :meth:`VLMPolicy.save` takes it); by default its own."""
        from safetensors.torch import save_file

        def part(prefix: str) -> dict[str, torch.Tensor] | None:
            if state_dict is None:
                return None
            return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}

        directory = Path(directory)
        self.backbone.save(directory, state_dict=part("backbone."))
        head_state = part("head.")
        state = {k: v.detach().cpu().contiguous() for k, v in (head_state or self.head.state_dict()).items()}
        save_file(state, str(directory / HEAD_FILE))
        (directory / VLA_FILE).write_text(json.dumps({"format": 1, "head": asdict(self.head_config)}, indent=2))


def build_vla_policy(policy: PolicyConfig, head: HeadConfig) -> VLAPolicy:
    """A new action-head policy: the backbone from ``policy`` (a preset, hub id, model directory, or a saved
    text policy), a fresh action head from ``head`` (seeded from ``policy.init_seed``). The backbone's
    ``prompt_style`` is set to ``action``: the policy writes no thoughts (its prompt is :func:`vla_prompt`)."""
    from agents.policy import load_text_policy

    options = asdict(policy)
    options["prompt_style"] = "action"  # an action-head policy writes no thoughts: none are checked
    return VLAPolicy(load_text_policy(options.pop("model"), **options), head)


def load_vla_policy(directory: str | Path, **overrides: Any) -> VLAPolicy:
    """Load a policy written by :meth:`VLAPolicy.save`; ``overrides`` change the backbone's options (device...)."""
    from safetensors.torch import load_file

    from agents.policy import load_text_policy

    directory = Path(directory)
    saved = json.loads((directory / VLA_FILE).read_text())
    policy = VLAPolicy(load_text_policy(str(directory), **overrides), HeadConfig(**saved["head"]))
    policy.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    return policy


__all__ = [
    "ActionHead",
    "HeadAction",
    "HeadConfig",
    "VLAPolicy",
    "build_vla_policy",
    "head_config_for",
    "load_vla_policy",
    "vla_prompt",
]
