"""Loading vision-language models and their processors: supported families, tiny presets, checkpoints.

Three ways to name a model, all through :func:`load_model`:

* a built-in preset (``"tiny"``, ``"tiny-qwen2vl"``, ... see :data:`PRESETS`): randomly initialised from a
  seed with the tokenizer shipped in ``agents/assets/tiny-tokenizer``; no network, milliseconds to build;
* a Hugging Face hub id (``"Qwen/Qwen2.5-VL-3B-Instruct"``);
* a local directory written by ``save_pretrained`` (or by :meth:`agents.policy.VLMPolicy.save`).

Qwen2-VL, Qwen2.5-VL and Idefics3/SmolVLM processors insist on a video processor that needs
torchvision; we never use video, so their processors are built here from the image processor and the
tokenizer (``AutoProcessor`` would silently return a bare tokenizer for them, or fail).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"


# ----------------------------------------------------------------------------------------------------------
# Processors without a video processor
# ----------------------------------------------------------------------------------------------------------


def _image_only(processor_class: type) -> type:
    """A subclass of ``processor_class`` whose constructor takes no video processor.

    ``ProcessorMixin`` infers a processor's parts from its ``__init__`` signature, so leaving
    ``video_processor`` out of the signature is what makes the parent accept ``None`` for it.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"{processor_class.__name__}ImageOnly", (processor_class,), {"__init__": __init__})


@lru_cache
def _qwen2vl_processor_class() -> type:
    from transformers import Qwen2VLProcessor

    return _image_only(Qwen2VLProcessor)


@lru_cache
def _qwen25vl_processor_class() -> type:
    from transformers import Qwen2_5_VLProcessor

    return _image_only(Qwen2_5_VLProcessor)


@lru_cache
def _smolvlm_processor_class() -> type:
    from transformers import SmolVLMProcessor

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len=169, chat_template=None, **kwargs):  # noqa: N807
        SmolVLMProcessor.__init__(self, image_processor, tokenizer, None, image_seq_len, chat_template, **kwargs)

    # SmolVLM's own apply_chat_template reads video settings; the generic one does all we need.
    namespace = {"__init__": __init__, "apply_chat_template": ProcessorMixin.apply_chat_template}
    return type("SmolVLMProcessorImageOnly", (SmolVLMProcessor,), namespace)


# ----------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What differs between model families, and nothing else.

    Attributes:
        name: The ``model_type`` of the model's config.
        image_placeholder: What the chat template writes where the image goes.
        nested_images: The processor wants one list of images per sample.
        rope_from_attention_mask: Text positions are ``cumsum(attention_mask) - 1`` (what ``generate``
            uses); ``False`` for multimodal RoPE families, whose model derives positions itself.
        load_processor: Builds the processor of a checkpoint directory or hub id.
    """

    name: str
    image_placeholder: str
    nested_images: bool
    rope_from_attention_mask: bool
    load_processor: Callable[[str], ProcessorMixin]


def _load_auto_processor(name_or_path: str) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(name_or_path)


def _chat_template_of(name_or_path: str, tokenizer: Any) -> str | None:
    """A checkpoint's chat template: processors save it beside the tokenizer, in one of two files."""
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


def _processor_loader(processor_class: Callable[[], type], image_processor_class: str) -> Callable:
    def load(name_or_path: str) -> ProcessorMixin:
        import transformers

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = getattr(transformers, image_processor_class).from_pretrained(name_or_path)
        kwargs: dict[str, Any] = {}
        processor_config = _json_file(name_or_path, "processor_config.json")
        if "image_seq_len" in processor_config:
            kwargs["image_seq_len"] = processor_config["image_seq_len"]
        return processor_class()(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=_chat_template_of(name_or_path, tokenizer),
            **kwargs,
        )

    return load


def _json_file(name_or_path: str, filename: str) -> dict[str, Any]:
    from transformers.utils import cached_file

    path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(path).read_text()) if path is not None else {}


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family("llava", "<image>", False, True, _load_auto_processor),
        Family("llava_next", "<image>", False, True, _load_auto_processor),
        Family(
            "qwen2_vl",
            "<|vision_start|><|image_pad|><|vision_end|>",
            False,
            False,
            _processor_loader(_qwen2vl_processor_class, "Qwen2VLImageProcessorPil"),
        ),
        Family(
            "qwen2_5_vl",
            "<|vision_start|><|image_pad|><|vision_end|>",
            False,
            False,
            _processor_loader(_qwen25vl_processor_class, "Qwen2VLImageProcessorPil"),
        ),
        Family(
            "idefics3",
            "<image>",
            True,
            True,
            _processor_loader(lambda: __import__("transformers").Idefics3Processor, "Idefics3ImageProcessorPil"),
        ),
        Family(
            "smolvlm",
            "<image>",
            True,
            True,
            _processor_loader(_smolvlm_processor_class, "SmolVLMImageProcessorPil"),
        ),
    ]
}


def family_of(model_type: str) -> Family:
    """The :class:`Family` for a config's ``model_type``; unsupported families fail with the list."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"Model family {model_type!r} is not supported. Supported: {', '.join(sorted(FAMILIES))}."
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Tiny presets
# ----------------------------------------------------------------------------------------------------------


def tiny_chat_template(image_placeholder: str) -> str:
    """A minimal chat template for the tiny presets (real checkpoints bring their own)."""
    return (
        "{%- for message in messages -%}"
        "<|{{ message['role'] }}|>\n"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}" + image_placeholder + "\n"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}</s>{%- endif -%}\n"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>\n{%- endif -%}"
    )


def tiny_tokenizer(image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """The shipped byte-level BPE of the tiny presets (see ``agents/assets/make_tiny_tokenizer.py``).

    ``image_token`` is the placeholder that the family's processor expands into image tokens.
    """
    path = TOKENIZER_DIR / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with python -m agents.assets.make_tiny_tokenizer")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": image_token},
    )
    return tokenizer


@dataclass(frozen=True)
class Preset:
    """A tiny randomly initialised model: which family, and how big."""

    family: str
    text_hidden: int = 128
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 64
    patch_size: int = 8
    description: str = ""


PRESETS: dict[str, Preset] = {
    # One 16 px patch per GridWorld cell (cell_px=16): moving the agent changes whole image tokens.
    "tiny": Preset(
        "llava", patch_size=16, description="LLaVA: CLIP vision tower + Llama, ~0.65 M parameters (the default)"
    ),
    # The tiny preset sees a 64 px image in 16 px patches (16 image tokens): a Blackjack card's rank is a few
    # pixels there, and thoughts that state card sums were true in ~70% of answers after SFT. This one keeps
    # the env's 128 px frame (64 image tokens) and doubles the widths, still small enough for a CPU.
    "small": Preset(
        "llava",
        text_hidden=256,
        text_layers=4,
        vision_hidden=128,
        vision_layers=3,
        image_size=128,
        patch_size=16,
        description="LLaVA at 128 px, 4 text layers of width 256 (larger than tiny; not a default)",
    ),
    "tiny-llava-next": Preset("llava_next", description="LLaVA-NeXT with any-resolution tiling"),
    "tiny-qwen2vl": Preset("qwen2_vl", image_size=56, patch_size=14, description="Qwen2-VL (multimodal RoPE)"),
    "tiny-qwen2.5vl": Preset("qwen2_5_vl", image_size=56, patch_size=14, description="Qwen2.5-VL"),
    "tiny-idefics3": Preset("idefics3", description="Idefics3 (SigLIP + Llama, pixel shuffle)"),
    "tiny-smolvlm": Preset("smolvlm", description="SmolVLM (Idefics3 architecture)"),
}


def _llama_config(tokenizer: PreTrainedTokenizerFast, preset: Preset) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_hidden * 2,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # With the usual 0.02, attention at random init is near uniform and the last prompt token hardly
        # depends on the image (a GridWorld cell change moves it by ~1%); 0.1 gives the RL signal
        # something to work with (~18%) while keeping the first answers high-entropy.
        initializer_range=0.1,
    )


def _vision_config(preset: Preset) -> dict[str, Any]:
    return dict(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_hidden * 2,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=2,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
    )


def build_preset(name: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny preset model and its processor, random-initialised from ``seed``.

    >>> model, processor = build_preset("tiny")
    >>> type(model).__name__, model.config.model_type
    ('LlavaForConditionalGeneration', 'llava')
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    family = FAMILIES[preset.family]
    tokenizer = tiny_tokenizer("<|image_pad|>" if family.name.startswith("qwen") else "<image>")
    chat_template = tiny_chat_template(family.image_placeholder)
    tok = tokenizer.convert_tokens_to_ids
    builder = _PRESET_BUILDERS[preset.family]
    config, processor = builder(preset, tokenizer, chat_template, tok)
    with seeded(seed):
        model = AutoModelForImageTextToText.from_config(config)
    model.eval()
    return model, processor


class quiet_progress:
    """Hide transformers' per-file progress bars (saving and loading tiny checkpoints every few updates)."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        if self._was_enabled:
            hf_logging.enable_progress_bar()


class seeded:
    """Fork torch's RNG so building a preset neither depends on nor disturbs the caller's RNG state."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def _build_llava(preset, tokenizer, chat_template, tok):
    """LLaVA, or LLaVA-NeXT (the same towers plus any-resolution tiling of the image)."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

    next_ = preset.family == "llava_next"
    size = preset.image_size
    tiling = {"image_grid_pinpoints": [[size, size], [size, 2 * size], [2 * size, size]]} if next_ else {}
    config = getattr(transformers, "LlavaNextConfig" if next_ else "LlavaConfig")(
        vision_config=CLIPVisionConfig(**_vision_config(preset)).to_dict(),
        text_config=LlamaConfig(**_llama_config(tokenizer, preset)).to_dict(),
        image_token_id=tok("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        **(tiling if next_ else {"image_seq_length": (size // preset.patch_size) ** 2}),
    )
    image_processor = getattr(transformers, "LlavaNextImageProcessorPil" if next_ else "CLIPImageProcessorPil")(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **tiling
    )
    processor = getattr(transformers, "LlavaNextProcessor" if next_ else "LlavaProcessor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat_template,
    )
    return config, processor


def _build_qwen(preset, tokenizer, chat_template, tok):
    from transformers import Qwen2VLImageProcessorPil

    if preset.family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config

        processor_class = _qwen2vl_processor_class()
        vision = dict(
            embed_dim=preset.vision_hidden, depth=preset.vision_layers, num_heads=2, hidden_size=preset.text_hidden
        )
    else:
        from transformers import Qwen2_5_VLConfig as Config

        processor_class = _qwen25vl_processor_class()
        vision = dict(
            hidden_size=preset.vision_hidden,
            intermediate_size=preset.vision_hidden * 2,
            depth=preset.vision_layers,
            num_heads=2,
            out_hidden_size=preset.text_hidden,
            fullatt_block_indexes=[preset.vision_layers - 1],
            window_size=56,
        )
    text = _llama_config(tokenizer, preset)
    head_dim = preset.text_hidden // text["num_attention_heads"]
    # Multimodal RoPE splits each head's rotary half (head_dim / 2) into temporal, height and width parts.
    quarter = head_dim // 8
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}
    vision.update(patch_size=preset.patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tok("<|image_pad|>"),
        video_token_id=tok("<|video_pad|>"),
        vision_start_token_id=tok("<|vision_start|>"),
        vision_end_token_id=tok("<|vision_end|>"),
    )
    pixels = preset.image_size * preset.image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=preset.patch_size, merge_size=2, temporal_patch_size=2
    )
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    return config, processor


def _build_idefics3(preset, tokenizer, chat_template, tok):
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor, SmolVLMConfig

    scale_factor = 2
    image_seq_len = (preset.image_size // preset.patch_size) ** 2 // scale_factor**2
    vision = _vision_config(preset)
    text = _llama_config(tokenizer, preset)
    image_processor_kwargs = dict(
        do_image_splitting=False,
        size={"longest_edge": preset.image_size},
        max_image_size={"longest_edge": preset.image_size},
    )
    if preset.family == "idefics3":
        config = Idefics3Config(
            vision_config=vision, text_config=text, image_token_id=tok("<image>"), scale_factor=scale_factor
        )
        image_processor = Idefics3ImageProcessorPil(**image_processor_kwargs)
        processor_class: type = Idefics3Processor
    else:
        from transformers import SmolVLMImageProcessorPil

        config = SmolVLMConfig(
            vision_config=vision, text_config=text, image_token_id=tok("<image>"), scale_factor=scale_factor
        )
        image_processor = SmolVLMImageProcessorPil(**image_processor_kwargs)
        processor_class = _smolvlm_processor_class()
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=chat_template,
    )
    return config, processor


_PRESET_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava,
    "qwen2_vl": _build_qwen,
    "qwen2_5_vl": _build_qwen,
    "idefics3": _build_idefics3,
    "smolvlm": _build_idefics3,
}


# ----------------------------------------------------------------------------------------------------------
# Loading anything
# ----------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def check_model_source(name_or_path: str, presets: Collection[str] = PRESETS) -> None:
    """Fail fast, with what to do, when ``name_or_path`` cannot be loaded from here.

    A preset (of ``presets``: the policy presets unless the caller loads another kind of model) or an
    existing directory is fine. A hub id is fine when its config is in the local Hugging Face
    cache or the Hub answers; otherwise (``HF_HUB_OFFLINE=1``, or no network) transformers would retry for
    half a minute before failing with an unhelpful message, so say now how to use a local copy instead.
    """
    from agents.errors import ConfigError

    if name_or_path in presets or Path(name_or_path).expanduser().exists():
        return
    parent = Path(name_or_path).expanduser().parent
    if (
        name_or_path.startswith(("tiny", ".", "/", "~"))
        or name_or_path.count("/") > 1
        or parent.is_dir()
        and str(parent) != "."
    ):
        raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(presets)}) nor an existing directory.")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return
    how = (
        f"Download it where there is a network (`hf download {name_or_path} --local-dir DIR`), copy DIR "
        "here and pass the directory as the model, or use a preset."
    )
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"Model {name_or_path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {how}"
        )
    if not _hub_reachable(constants.ENDPOINT):
        raise ConfigError(
            f"Model {name_or_path!r} is not in the local Hugging Face cache and {constants.ENDPOINT} cannot be reached. {how}"
        )


def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError:
        return False
    return True


def load_model(
    name_or_path: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin, Family]:
    """Load a preset, a hub id or a local directory; return ``(model, processor, family)``.

    Unknown presets, missing directories and unsupported families fail here, before any weights load,
    with a message that says what is available.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path in PRESETS:
        model, processor = build_preset(name_or_path, seed)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model.to(torch_dtype), processor, family_of(model.config.model_type)
    check_model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(
            f"Cannot load a model config from {name_or_path!r} ({error}). Give a preset "
            f"({', '.join(PRESETS)}), a local model directory, or a hub id you can download."
        ) from error
    family = family_of(config.model_type)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with quiet_progress():
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    processor = family.load_processor(name_or_path)
    processor.tokenizer.padding_side = "left"
    model.eval()
    return model, processor, family
