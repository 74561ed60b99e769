"""Build the tokenizer of the tiny presets: ``python -m agents.assets.make_tiny_tokenizer``.

A byte-level BPE trained in milliseconds on the prompts and answers of every registered environment,
so prompts stay short (few tokens per word) while any text, unicode included, still encodes. The
result, ``agents/assets/tiny-tokenizer/tokenizer.json``, is shipped with the project: the tiny presets
load it from there, so runs never depend on re-training it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

#: Special tokens of every tiny family. Their order fixes their ids; append, never reorder.
SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<image>",  # LLaVA / LLaVA-NeXT image placeholder
    "<|vision_start|>",  # Qwen2-VL family
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<fake_token_around_image>",  # Idefics3 / SmolVLM
    "<global-img>",
    "<end_of_utterance>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
    "<|user|>",  # the tiny chat template's role markers
    "<|assistant|>",
]
VOCAB_SIZE = 1024
OUTPUT = Path(__file__).parent / "tiny-tokenizer" / "tokenizer.json"

_GENERIC = """
The agent looks at the image and thinks step by step before it acts. I see the card, the number, the
target, the goal, the wall, the block, the gripper and the table. My sum is low so I hit; the dealer
shows a high card. The formula is not complete yet. I should move left, right, up, down, forward or
backward to get closer. Current position, target position, reached, step, of, and, the, is, a, to.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 + - * / ( ) = { } [ ] " : , .
"""


def corpus() -> list[str]:
    """Texts the tokenizer is trained on: every env's prompts (both styles) and expert answers."""
    import envs
    from envs.language import build_prompt, format_answer, get_language

    texts = [_GENERIC]
    for env_id in envs.language_env_ids():
        spec = get_language(env_id)
        for style in ("cot", "action"):
            texts.append(build_prompt(spec, "", style))
        for name in spec.action_names:
            texts.append(format_answer(name, f"I choose {name} because it gets me closer to the goal."))
    return texts


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(OUTPUT))
    print(f"wrote {OUTPUT} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
