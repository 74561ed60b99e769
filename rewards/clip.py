"""CLIP as a zero-shot reward model: VLM-RM (Rocamonde et al. 2023, https://arxiv.org/abs/2310.12921).

The goal is stated in words (``g``: "the blue circle is on the green square"), and so is what every frame
shows whether or not the goal is reached (``b``, the baseline: "a grid with a blue circle and a green
square"). With ``x`` the image embedding, all three unit-normalised, the reward is (their eq. 3)::

    R(x) = 1 - 0.5 * |(x - g) P|^2,    P = alpha * d d^T / |d|^2 + (1 - alpha) * I,    d = g - b

``alpha = 0`` is plain cosine similarity to the goal (``1 - 0.5 |x - g|^2 = x . g`` for unit vectors);
``alpha = 1`` keeps only the component of ``x - g`` along the goal-baseline direction, removing what the
two prompts share (the paper's "goal-baseline regularisation"; they use alpha 0.5). ``g`` and ``b`` are the
means of several prompts' unit text embeddings, normalised again (averaging prompts steadies a small
CLIP's text side). The paper reports that small CLIPs work poorly zero-shot: ``vlmrl clip-adapt``
(:func:`main` below) fine-tunes one contrastively on an env's frames and captions the env states (on
Reach, captioned with distance bands, the adapted tiny CLIP's reward ranks held-out frames by distance
at Spearman's rho 0.85 with alpha 0.5; with the expert's unique rationales as captions, at ~0: README).

Any Hugging Face CLIP or SigLIP works (``AutoModel`` with ``get_text_features``/``get_image_features``,
its tokenizer and image processor), by hub id or local directory; ``"tiny-clip"`` is a randomly
initialised CLIP built from a config with the shipped tiny tokenizer, for tests and offline runs.
As a reward module: ``clip:1.0`` (prompts of the env: :func:`default_prompts`), or
``clip:1.0:model=openai/clip-vit-base-patch32,alpha=0.5,goal=a red ball in the gripper|...,baseline=...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import tyro

TINY_CLIP = "tiny-clip"
#: The end-of-text token the tiny CLIP pools at. CLIP reads the text embedding at the first end-of-text
#: token, and transformers treats ``eos_token_id == 2`` (the tiny tokenizer's ``</s>``) as an old config
#: whose pooling is an argmax over ids, so the tiny CLIP gets its own end token, as OpenAI's has.
TINY_CLIP_END = "<|endoftext|>"
TINY_CLIP_MAX_TOKENS = 77  # OpenAI CLIP's context length

#: Default (goal prompts, baseline prompts) per environment id whose language spec has no progress captions
#: (Reach's come from its spec: see :func:`default_prompts`); a config's ``goal``/``baseline`` replace them.
ENV_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vlmrl/GridWorld-v0": (
        ("the blue circle is on the green square", "a blue circle covering a green square in a grid"),
        ("a blue circle and a green square in a grid", "a grid with grey walls, a blue circle and a green square"),
    ),
    "vlmrl/Push-v0": (
        ("the box is on the goal mark", "a box pushed onto the target on the table"),
        ("a box and a goal mark on a table", "a gripper, a box and a target on a table"),
    ),
    "vlmrl/Colour-v0": (("a red image",), ("a coloured image",)),
}


def default_prompts(env_id: str | None) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """An env's default (goal, baseline) prompts: the first and last of its language spec's
    ``progress_captions`` (the captions ``vlmrl clip-adapt`` teaches), else :data:`ENV_PROMPTS`, else ``None``."""
    if env_id is None:
        return None
    import envs  # noqa: F401 - registers the environments and their language specs

    try:
        captions = envs.get_language(env_id).progress_captions
    except KeyError:
        captions = ()
    if captions:
        return (captions[0],), (captions[-1],)
    return ENV_PROMPTS.get(env_id)


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_direction(embeddings: torch.Tensor) -> torch.Tensor:
    """The unit mean of unit-normalised embeddings (several prompts for one concept)."""
    return unit(unit(embeddings).mean(dim=0))


def vlm_rm_reward(images: torch.Tensor, goal: torch.Tensor, baseline: torch.Tensor, alpha: float) -> torch.Tensor:
    """``1 - 0.5 * |(x - g) P|^2`` for each row ``x`` of ``images``; every input is unit-normalised first.

    >>> x = torch.tensor([[0.6, 0.8]]); g = torch.tensor([1.0, 0.0]); b = torch.tensor([0.0, 1.0])
    >>> [round(vlm_rm_reward(x, g, b, a).item(), 4) for a in (0.0, 0.5, 1.0)]
    [0.6, 0.63, 0.64]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"clip: alpha={alpha}; use a value in [0, 1] (VLM-RM: 0.5).")
    if images.shape[-1] != goal.shape[-1] or goal.shape != baseline.shape:
        raise ValueError(
            f"clip: image embeddings have size {images.shape[-1]}, goal {goal.shape[-1]} and baseline "
            f"{baseline.shape[-1]}; the text and image embeddings must come from the same CLIP model."
        )
    x, g, b = unit(images.float()), unit(goal.float()), unit(baseline.float())
    direction = g - b
    norm_squared = direction.dot(direction)
    if norm_squared < 1e-12:
        raise ValueError(
            "clip: the goal and baseline prompts give the same embedding (d = g - b = 0), so the projection is "
            "undefined; describe the goal state in the goal prompts and only what every frame shows in the baseline."
        )
    identity = torch.eye(len(g), dtype=g.dtype, device=g.device)
    projection = alpha * torch.outer(direction, direction) / norm_squared + (1 - alpha) * identity
    return 1 - 0.5 * ((x - g) @ projection).norm(dim=-1) ** 2


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def tiny_clip_tokenizer() -> Any:
    """The shipped tiny BPE with CLIP's habits: an end-of-text token appended to every text, right padding."""
    from tokenizers.processors import TemplateProcessing

    from agents.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": TINY_CLIP_END})
    end_id = tokenizer.convert_tokens_to_ids(TINY_CLIP_END)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {TINY_CLIP_END}", special_tokens=[(TINY_CLIP_END, end_id)]
    )
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = TINY_CLIP_MAX_TOKENS  # truncation keeps the end token (added after it)
    return tokenizer


def build_tiny_clip(seed: int = 0, image_size: int = 64, embedding_size: int = 32) -> tuple[Any, Any, Any]:
    """A randomly initialised CLIP (~0.2 M parameters) with its tokenizer and image processor; no download."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from agents.models import seeded

    tokenizer = tiny_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_CLIP_MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=16,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=embedding_size)
    with seeded(seed):
        model = CLIPModel(config)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessorPil(size=size, crop_size=crop)
    return model.eval(), tokenizer, image_processor


def load_clip(name_or_path: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, image_processor)`` of ``"tiny-clip"``, a hub id or a local directory."""
    if name_or_path == TINY_CLIP:
        return build_tiny_clip(seed)
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from agents.models import check_model_source

    check_model_source(name_or_path, presets=(TINY_CLIP,))  # a policy preset ("tiny") is not a CLIP
    model = AutoModel.from_pretrained(name_or_path)
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise ValueError(
            f"{name_or_path} ({type(model).__name__}) is not a contrastive image-text model; give a CLIP or SigLIP."
        )
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path), AutoImageProcessor.from_pretrained(name_or_path)


def _tokenize(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    """Token ids as the model was trained on them: SigLIP on texts padded to a fixed length (64), CLIP on
    any padding (it pools at the end token); both cut at the model's position limit."""
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    padding = "max_length" if "siglip" in model.config.model_type else True
    inputs = tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    return inputs


def _pixels(image_processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """The image processor's ``pixel_values`` of a list of frames (arrays or PIL images)."""
    from agents.policy import to_pil

    return image_processor(images=[to_pil(image) for image in images], return_tensors="pt")["pixel_values"]


def _features(output: Any) -> torch.Tensor:
    """Embeddings from ``get_*_features``: a tensor in older transformers, an output with ``pooler_output`` in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------------------------------------
# The reward module
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClipRewardConfig:
    """Options of the ``clip`` reward (``clip:WEIGHT:KEY=VALUE,...``; lists of prompts joined with ``|``)."""

    model: str = TINY_CLIP
    """``"tiny-clip"`` (random weights, for tests), a hub id (``openai/clip-vit-base-patch32``,
    ``google/siglip-base-patch16-224``) or a local directory."""
    goal: tuple[str, ...] = ()
    """Prompts that describe the goal state; default: the env's (:func:`default_prompts`)."""
    baseline: tuple[str, ...] = ()
    """Prompts that describe what every frame shows, or the state farthest from the goal; default: the env's."""
    alpha: float = 0.5
    """Goal-baseline regularisation strength in [0, 1] (VLM-RM: 0.5; 0 is plain cosine similarity)."""
    batch_size: int = 32
    """Images embedded per forward pass."""
    seed: int = 0
    """Initialisation seed of ``tiny-clip``."""
    frame: str = "next"
    """Which frame is scored: ``"next"``, the state the step reached (VLM-RM rewards the state an action
    leads to; needs ``next_observations`` in the call), or ``"current"``, the frame the policy answered."""


class ClipReward:
    """The VLM-RM reward of each step's observation image (the frame the policy answered)."""

    def __init__(self, config: ClipRewardConfig, env_id: str | None = None, device: str = "cpu") -> None:
        goal, baseline = config.goal, config.baseline
        if not goal or not baseline:
            defaults = default_prompts(env_id)
            if defaults is None:
                raise ValueError(
                    f"clip: no default prompts for {env_id!r} (defaults exist for {', '.join(ENV_PROMPTS)} and envs "
                    "whose language spec has progress_captions); give goal=PROMPT|PROMPT and baseline=PROMPT|PROMPT."
                )
            goal, baseline = goal or defaults[0], baseline or defaults[1]
        if config.frame not in ("next", "current"):
            raise ValueError(f"clip: frame={config.frame!r}; use next or current.")
        if set(goal) == set(baseline):
            raise ValueError("clip: the goal and baseline prompts are the same; the reward needs them to differ.")
        self.config = config
        self.device = torch.device(device)
        self.model, self.tokenizer, self.image_processor = load_clip(config.model, config.seed)
        self.model.to(self.device)
        self.goal = mean_direction(self.embed_texts(list(goal)))
        self.baseline = mean_direction(self.embed_texts(list(baseline)))
        # Fails now, not at the first step, when the prompts coincide in embedding space.
        vlm_rm_reward(self.goal[None], self.goal, self.baseline, config.alpha)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        inputs = _tokenize(self.model, self.tokenizer, texts).to(self.device)
        return _features(self.model.get_text_features(**inputs)).float()

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        batches = []
        for start in range(0, len(images), self.config.batch_size):
            pixels = _pixels(self.image_processor, images[start : start + self.config.batch_size]).to(self.device)
            batches.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.cat(batches)

    def scores(self, images: Sequence[Any]) -> torch.Tensor:
        return vlm_rm_reward(self.embed_images(images), self.goal, self.baseline, self.config.alpha)

    def __call__(
        self, observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any
    ) -> list[float]:
        from agents.policy import split_observations

        if self.config.frame == "next":
            if step.get("next_observations") is None:
                raise ValueError(
                    "clip: frame=next scores the state each step reached; pass next_observations= to the RewardSet "
                    "(rewards.next_observations builds them), or use clip:WEIGHT:frame=current."
                )
            observations = step["next_observations"]
        images, _ = split_observations(observations)
        return self.scores(images).cpu().tolist()


def build_clip_reward(context: Any, options: dict[str, str]) -> ClipReward:
    from rewards import options_to

    return ClipReward(options_to(ClipRewardConfig, options, "clip"), context.env_id, context.device)


# ----------------------------------------------------------------------------------------------------------
# Adapting a CLIP to an environment (contrastive fine-tuning on its frames)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClipAdaptConfig:
    """``vlmrl clip-adapt``: fine-tune a CLIP on an env's frames and the captions the env can state.

    Small CLIPs reward poorly zero-shot (VLM-RM, section 5); this teaches one the env's picture language.
    Frames come from episodes of the env's scripted expert (with ``random_action_probability``, some steps
    take a random action instead, for frames the expert passes quickly). Captions (``captions``):

    * ``progress``: the env's ``progress_caption()``, one of its language spec's ``progress_captions``
      (Reach: five gripper-to-ball distance bands from "touching" to "very far"). Many frames share each
      caption, and the ``clip`` reward's default prompts are the first and the last of them.
    * ``rationale``: the expert's ``expert_rationale()`` ("The goal is 2 cells right and 1 cell up; ..."),
      or the env's goal prompt on the frame where an episode succeeded. Nearly every caption is unique, so
      there is little to match: on Reach this left the reward's rank correlation with progress at ~0.

    The loss is CLIP's symmetric InfoNCE (Radford et al. 2021) over the distinct captions of each batch
    (:func:`contrastive_loss`): frames that share a caption share one class instead of being each other's
    negatives.
    """

    env_id: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="ENV_ID")]
    """Environment with a scripted expert (``expert_action``), e.g. vlmrl/Reach-v0."""
    out: str
    """Directory to save the adapted model, tokenizer and image processor to (``clip:1:model=DIR`` then)."""
    model: str = TINY_CLIP
    """The CLIP to start from: ``tiny-clip``, a hub id or a directory."""
    captions: Literal["auto", "progress", "rationale"] = "auto"
    """What each frame is captioned with (see above); ``auto``: ``progress`` when the env's language spec has
    progress captions, else ``rationale``."""
    episodes: int = 50
    """Episodes to draw frames from (seeds ``seed`` ..)."""
    random_action_probability: float = 0.0
    """Chance that a step takes a uniformly random action instead of the expert's (more frames far from
    the goal; the frame is captioned all the same)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 32
    """Frame-caption pairs per step."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the episodes, the random actions, the batches and (``tiny-clip``) the initial weights."""
    device: str = "cpu"
    """Where to train."""
    env_module: str | None = None
    """Module to import first, for a third-party env that it registers (as ``vlmrl train --env-module``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_action_probability <= 1.0:
            raise ValueError(f"random_action_probability={self.random_action_probability}; use a value in [0, 1].")
        if self.episodes < 1 or self.steps < 1 or self.batch_size < 2:
            raise ValueError("clip-adapt needs episodes >= 1, steps >= 1 and batch_size >= 2 (contrast needs pairs).")


def captioned_frames(
    env_id: str,
    episodes: int,
    seed: int = 0,
    captions: str = "auto",
    random_action_probability: float = 0.0,
    env_kwargs: dict | None = None,
) -> tuple[list, list[str]]:
    """Frames of (mostly) expert episodes and their captions (see :class:`ClipAdaptConfig`)."""
    import gymnasium as gym
    import numpy as np

    import envs

    envs.check_registered(env_id)
    env = gym.make(env_id, **(env_kwargs or {}))
    unwrapped = env.unwrapped
    try:
        progress_captions = envs.get_language(env_id).progress_captions
    except KeyError:
        progress_captions = ()
    if captions == "auto":
        captions = "progress" if progress_captions else "rationale"
    if captions == "progress":
        if not (progress_captions and hasattr(unwrapped, "progress_caption")):
            raise ValueError(
                f"{env_id}: captions=progress needs progress_captions in its language spec and a progress_caption() "
                "method on the env; use --captions rationale."
            )
        caption = unwrapped.progress_caption
    elif captions == "rationale":
        if not hasattr(unwrapped, "expert_rationale"):
            raise ValueError(f"{env_id} has no expert_rationale(); it cannot caption its frames with one.")
        caption = unwrapped.expert_rationale
    else:
        raise ValueError(f"captions={captions!r}; use auto, progress or rationale.")
    if not hasattr(unwrapped, "expert_action"):
        raise ValueError(f"{env_id} has no scripted expert (expert_action) to play the episodes.")
    goal_caption = (default_prompts(env_id) or (("the task is done",), ()))[0][0]
    rng = np.random.default_rng(seed)
    frames, texts = [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        env.action_space.seed(seed + episode)
        done = False
        while not done:
            frames.append(observation["image"])
            texts.append(caption())
            random_step = rng.random() < random_action_probability
            action = env.action_space.sample() if random_step else unwrapped.expert_action()
            observation, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        if terminated and info.get("success", False):
            frames.append(observation["image"])
            texts.append(caption() if captions == "progress" else goal_caption)
    env.close()
    return frames, texts


def contrastive_loss(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor, logit_scale: torch.Tensor,
                     caption_of_image: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Symmetric InfoNCE between a batch of images and the distinct captions among them.

    ``caption_embeddings`` has one row per distinct caption and ``caption_of_image[i]`` is the row of image
    ``i``'s caption. A caption that several images share is one class, not several: plain CLIP InfoNCE on
    (image, caption) pairs would make two frames with the same caption each other's negatives, which no
    embedding can satisfy (with only a few recurring captions its loss cannot go below ln(repeats)). Image
    to text is a cross-entropy over the distinct captions; text to image, for each caption, the KL divergence
    from a target spread evenly over the images that carry it to the softmax over the batch's images (the
    cross-entropy less the target's entropy, so that a perfect match scores 0 however many images share the
    caption; with distinct captions both terms are CLIP's).

    >>> e = torch.eye(2); round(contrastive_loss(e, e, torch.tensor(0.0), torch.tensor([0, 1])).item(), 4)
    0.3133
    >>> images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two frames share caption 0
    >>> round(contrastive_loss(images, e, torch.tensor(4.0), torch.tensor([0, 0, 1])).item(), 4)
    0.0
    """
    logits = logit_scale.exp() * unit(image_embeddings) @ unit(caption_embeddings).T  # (images, captions)
    image_to_text = torch.nn.functional.cross_entropy(logits, caption_of_image)
    carries = torch.nn.functional.one_hot(caption_of_image, len(caption_embeddings)).T.float()  # (captions, images)
    present = carries.sum(dim=1) > 0
    targets = carries[present] / carries[present].sum(dim=1, keepdim=True)
    cross_entropy = -(targets * torch.log_softmax(logits.T[present], dim=1)).sum(dim=1)
    text_to_image = (cross_entropy + (targets * targets.clamp_min(1e-12).log()).sum(dim=1)).mean()
    return (image_to_text + text_to_image) / 2


def adapt_clip(config: ClipAdaptConfig, log: Any = print) -> dict[str, float]:
    """Fine-tune as ``config`` says, save to ``config.out``, and return the frame and caption counts and the
    first and last batch loss (and the mean of the first and last ten steps', which vary less)."""
    if config.env_module:
        from agents.run import import_env_module

        import_env_module(config.env_module)
    frames, captions = captioned_frames(
        config.env_id, config.episodes, config.seed, config.captions, config.random_action_probability
    )
    if len(set(captions)) < 2:
        raise ValueError(f"{config.env_id}: the frames have one caption only; contrast needs at least two.")
    device = torch.device(config.device)
    model, tokenizer, image_processor = load_clip(config.model, config.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    # The image processor runs once per frame, not once per batch (it took most of a tiny CLIP's step);
    # half precision halves the memory that all frames' pixel values take.
    pixel_values = torch.cat(
        [_pixels(image_processor, frames[start : start + 256]).half() for start in range(0, len(frames), 256)]
    )
    counts = {caption: captions.count(caption) for caption in dict.fromkeys(captions)}
    log(f"clip-adapt: {len(frames)} frames, {len(counts)} captions" + (f": {counts}" if len(counts) <= 10 else ""))
    metrics: dict[str, float] = {"frames": len(frames), "captions": len(counts)}
    losses = []
    for step in range(config.steps):
        batch = torch.randperm(len(frames), generator=generator)[: config.batch_size].tolist()
        distinct = list(dict.fromkeys(captions[i] for i in batch))
        caption_of_image = torch.tensor([distinct.index(captions[i]) for i in batch], device=device)
        pixels = pixel_values[batch].to(device=device, dtype=model.dtype)
        tokens = _tokenize(model, tokenizer, distinct).to(device)
        loss = contrastive_loss(
            _features(model.get_image_features(pixel_values=pixels)),
            _features(model.get_text_features(**tokens)),
            model.logit_scale,
            caption_of_image,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps - 1:
            log(f"clip-adapt step {step}: loss {loss.item():.4f}")
    metrics.update(
        first_loss=losses[0],
        last_loss=losses[-1],
        first_10_mean_loss=sum(losses[:10]) / len(losses[:10]),
        last_10_mean_loss=sum(losses[-10:]) / len(losses[-10:]),
    )
    model.eval().save_pretrained(config.out)
    tokenizer.save_pretrained(config.out)
    image_processor.save_pretrained(config.out)
    return metrics


def main(argv: list[str] | None = None) -> None:
    import json

    print(json.dumps(adapt_clip(tyro.cli(ClipAdaptConfig, args=argv)), indent=2))


if __name__ == "__main__":
    main()
