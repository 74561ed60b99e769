"""The VLM-RM CLIP reward: the formula by hand, its errors, and the tiny offline CLIP end to end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import envs  # noqa: F401 - registers the environments
from envs.language import LanguageSpec
from rewards import RewardContext, RewardSet, next_observations
from rewards.clip import (
    ENV_PROMPTS,
    TINY_CLIP_END,
    ClipReward,
    ClipRewardConfig,
    contrastive_loss,
    default_prompts,
    mean_direction,
    tiny_clip_tokenizer,
    vlm_rm_reward,
)

GRID = "vlmrl/GridWorld-v0"
REACH = "vlmrl/Reach-v0"


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, 0.6), (0.5, 0.63), (1.0, 0.64)])
def test_formula_by_hand(alpha, expected):
    # x = (0.6, 0.8), g = (1, 0), b = (0, 1): d = (1, -1), |d|^2 = 2, x - g = (-0.4, 0.8).
    # alpha 0: P = I, |x - g|^2 = 0.8 -> 0.6.  alpha 1: (x - g) P = ((x - g).d) d / 2 = (-0.6, 0.6), 0.72 -> 0.64.
    # alpha 0.5: the mean of the two rows, (-0.5, 0.7), 0.74 -> 0.63.
    x = torch.tensor([[0.6, 0.8]])
    got = vlm_rm_reward(x, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), alpha)
    assert got.item() == pytest.approx(expected)
    # Inputs are normalised first: scaling any of them changes nothing.
    scaled = vlm_rm_reward(3 * x, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.5]), alpha)
    assert scaled.item() == pytest.approx(expected)


def test_formula_against_numpy_in_higher_dimension():
    rng = np.random.default_rng(0)
    x, g, b = rng.normal(size=(5, 8)), rng.normal(size=8), rng.normal(size=8)
    x, g, b = x / np.linalg.norm(x, axis=1, keepdims=True), g / np.linalg.norm(g), b / np.linalg.norm(b)
    d = g - b
    projection = 0.3 * np.outer(d, d) / d.dot(d) + 0.7 * np.eye(8)
    expected = 1 - 0.5 * np.sum(((x - g) @ projection) ** 2, axis=1)
    got = vlm_rm_reward(torch.tensor(x), torch.tensor(g), torch.tensor(b), 0.3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # alpha 0 is the cosine similarity to the goal.
    np.testing.assert_allclose(vlm_rm_reward(torch.tensor(x), torch.tensor(g), torch.tensor(b), 0.0), x @ g, rtol=1e-5)


def test_formula_errors():
    g, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"image embeddings have size 3, goal 2"):
        vlm_rm_reward(torch.ones(1, 3), g, b, 0.5)
    with pytest.raises(ValueError, match=r"same embedding \(d = g - b = 0\)"):
        vlm_rm_reward(torch.ones(1, 2), g, 2 * g, 0.5)
    with pytest.raises(ValueError, match=r"alpha=1.5"):
        vlm_rm_reward(torch.ones(1, 2), g, b, 1.5)
    assert torch.allclose(mean_direction(torch.tensor([[2.0, 0.0], [0.0, 5.0]])), torch.tensor([1.0, 1.0]) / 2**0.5)


def test_tiny_clip_tokenizer_ends_every_text_like_clip():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer(["a red ball", "a ball"], padding=True)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(TINY_CLIP_END)
    assert ids[0][-1] == end and end in ids[1] and tokenizer.eos_token_id == end != 2


@pytest.fixture(scope="module")
def clip():
    return ClipReward(ClipRewardConfig(frame="current"), GRID)


def test_tiny_clip_reward_on_gridworld_frames(clip):
    import gymnasium as gym

    env = gym.make(GRID, size=4, n_walls=1)
    frames = [env.reset(seed=seed)[0]["image"] for seed in range(3)]
    batch = clip.scores(frames)
    one_by_one = torch.cat([clip.scores([frame]) for frame in frames])
    torch.testing.assert_close(batch, one_by_one, rtol=1e-4, atol=1e-5)
    expected = vlm_rm_reward(clip.embed_images(frames), clip.goal, clip.baseline, 0.5)
    torch.testing.assert_close(batch, expected)
    assert clip.goal.shape == (32,) and torch.all(batch <= 1.0)


def test_clip_config_errors():
    with pytest.raises(ValueError, match=r"goal and baseline prompts are the same"):
        ClipReward(ClipRewardConfig(goal=("a cat",), baseline=("a cat",)), GRID)
    with pytest.raises(ValueError, match=r"no default prompts for 'vlmrl/Blackjack-v0'"):
        ClipReward(ClipRewardConfig(), "vlmrl/Blackjack-v0")


def test_clip_in_a_reward_set_scores_the_reached_frame():
    from agents.rollout import make_vector_env

    rewards = RewardSet.from_specs(["env:1", "clip:0.5:alpha=1.0"], RewardContext(env_id=GRID))
    vector_env = make_vector_env(GRID, 2, {"size": 3, "n_walls": 0})
    observations, _ = vector_env.reset(seed=[0, 1])
    after, env_rewards, terminated, truncated, info = vector_env.step(np.array([0, 1]))
    reached = next_observations(after, info)
    completions = [SimpleNamespace(text="up", action=0)] * 2
    result = rewards(
        observations, completions, info, env_rewards=env_rewards, terminated=terminated, truncated=truncated,
        next_observations=reached,
    )  # fmt: skip
    clip = next(module for name, _, module in rewards.modules if name == "clip")
    np.testing.assert_allclose(result.terms["clip"], clip.scores(list(reached["image"])).numpy(), rtol=1e-5)
    np.testing.assert_allclose(result.total, env_rewards + 0.5 * result.terms["clip"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"pass next_observations="):
        rewards(observations, completions, info, env_rewards=env_rewards, terminated=terminated)
    vector_env.close()


def test_reach_progress_captions_for_hand_placed_states():
    from envs.manipulation import ReachEnv

    captions = ReachEnv.language.progress_captions
    env = ReachEnv(image_size=32)
    gripper = np.array([-0.15, 0.0, 0.1])
    # Ball this far to the right of the gripper (metres) -> expected band; 0.04 is the success radius: the
    # touching band ends where success begins.
    for gap, band in [(0.01, 0), (0.039, 0), (0.041, 1), (0.06, 1), (0.079, 1), (0.1, 2), (0.18, 3), (0.3, 4)]:
        env.reset(seed=0, options={"gripper": gripper, "target": gripper + [gap, 0.0, 0.0]})
        assert env.progress_caption() == captions[band], gap
        assert env._solved() == (band == 0), gap
    # A diagonal gap counts by its length: 6 cm along each axis is 10.4 cm away.
    env.reset(seed=0, options={"gripper": gripper, "target": gripper + [0.06, 0.06, 0.0]})
    assert env.progress_caption() == captions[2]
    env.close()
    # The clip reward's default prompts are the closest and the farthest band; GridWorld keeps its own.
    assert default_prompts(REACH) == ((captions[0],), (captions[-1],))
    assert default_prompts(GRID) == ENV_PROMPTS[GRID] and default_prompts("vlmrl/Blackjack-v0") is None


@pytest.mark.parametrize(
    ("captions", "message"),
    [(("done",), "at least two"), (("done", "far", "done"), "distinct"), (("done", " "), "non-blank")],
)
def test_bad_progress_captions_are_rejected(captions, message):
    with pytest.raises(ValueError, match=message):
        LanguageSpec("Do it.", ("a", "b"), progress_captions=captions)


def test_contrastive_loss_counts_a_repeated_caption_once():
    # Images 0 and 1 share caption 0 and are embedded exactly on it, image 2 on caption 1.
    captions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    caption_of_image = torch.tensor([0, 0, 1])
    scale = torch.tensor(5.0)  # logit scale e^5 ~ 148
    assert contrastive_loss(images, captions, scale, caption_of_image).item() < 1e-3
    # Plain CLIP InfoNCE on the pairs, the repeated caption as its own negative, cannot do better than
    # ln 2 in the rows of the two frames that share it: (4 ln 2 / 3) / 2 over both directions.
    pair_logits = scale.exp() * images @ captions[caption_of_image].T
    plain = (
        torch.nn.functional.cross_entropy(pair_logits, torch.arange(3))
        + torch.nn.functional.cross_entropy(pair_logits.T, torch.arange(3))
    ) / 2
    assert plain.item() == pytest.approx(2 * np.log(2) / 3, abs=1e-3)
    # By hand, logit scale 1 (e^0): cosine logits image x caption [[1, 0], [1, 0], [0, 1]].
    # Image to text: rows [1, 0], [1, 0], [0, 1] against targets 0, 0, 1: each -log(e / (e + 1)) = 0.3133.
    # Text to image: caption 0 over the images [1, 1, 0], target (1/2, 1/2, 0): CE = -log(e / (2e + 1)) =
    # 0.8620, less the target's entropy ln 2 -> 0.1689; caption 1 over [0, 0, 1], target (0, 0, 1): 0.5514.
    expected = (0.3133 + (0.1689 + 0.5514) / 2) / 2
    got = contrastive_loss(images, captions, torch.tensor(0.0), caption_of_image).item()
    assert got == pytest.approx(expected, abs=1e-3)
    # The order of the captions' rows does not matter.
    swapped = contrastive_loss(images, captions.flip(0), torch.tensor(0.0), 1 - caption_of_image).item()
    assert swapped == pytest.approx(got, abs=1e-6)


def _loss_of(model, tokenizer, image_processor, frames, captions) -> float:
    from agents.policy import to_pil
    from rewards.clip import _features, _tokenize

    distinct = list(dict.fromkeys(captions))
    with torch.no_grad():
        pixels = image_processor(images=[to_pil(f) for f in frames], return_tensors="pt")["pixel_values"]
        return contrastive_loss(
            _features(model.get_image_features(pixel_values=pixels)),
            _features(model.get_text_features(**_tokenize(model, tokenizer, distinct))),
            model.logit_scale,
            torch.tensor([distinct.index(c) for c in captions]),
        ).item()


def test_clip_adapt_lowers_the_contrastive_loss_and_the_result_serves_as_reward(tmp_path):
    from experiments.cli import main
    from rewards.clip import build_tiny_clip, captioned_frames, load_clip

    # GridWorld has no progress captions: captions=auto means the expert's rationale.
    main(["clip-adapt", GRID, "--out", str(tmp_path / "clip"), "--episodes", "4", "--steps", "12",
          "--batch-size", "16", "--learning-rate", "1e-3"])  # fmt: skip
    frames, captions = captioned_frames(GRID, 4)
    assert ENV_PROMPTS[GRID][0][0] in captions and len(set(captions)) > 3
    after = _loss_of(*load_clip(str(tmp_path / "clip")), frames, captions)
    assert after < _loss_of(*build_tiny_clip(0), frames, captions)
    reward = ClipReward(ClipRewardConfig(model=str(tmp_path / "clip"), frame="current"), GRID)
    assert reward.scores(frames[:2]).shape == (2,)
    with pytest.raises(ValueError, match=r"captions=progress needs progress_captions"):
        captioned_frames(GRID, 1, captions="progress")


def test_clip_adapt_on_reach_progress_captions(tmp_path):
    from envs.manipulation import ReachEnv
    from rewards.clip import ClipAdaptConfig, adapt_clip, captioned_frames

    captions = ReachEnv.language.progress_captions
    expert_frames, expert_captions = captioned_frames(REACH, 3, seed=5)
    mixed_frames, mixed_captions = captioned_frames(REACH, 3, seed=5, random_action_probability=0.5)
    assert set(expert_captions) <= set(captions) and expert_captions.count(captions[0]) == 3  # each episode ends on it
    assert len(mixed_frames) > len(expert_frames)  # random steps make the episodes longer
    config = ClipAdaptConfig(REACH, out=str(tmp_path / "clip"), episodes=3, steps=6, batch_size=8, learning_rate=1e-3,
                             random_action_probability=0.5, seed=5)  # fmt: skip
    metrics = adapt_clip(config, log=lambda _: None)
    assert metrics["frames"] == len(mixed_frames) and metrics["captions"] == len(set(mixed_captions)) >= 3
    reward = ClipReward(ClipRewardConfig(model=str(tmp_path / "clip"), frame="current", alpha=1.0), REACH)
    assert reward.scores(mixed_frames[:3]).shape == (3,)
    with pytest.raises(ValueError, match=r"random_action_probability=2"):
        ClipAdaptConfig(REACH, out="x", random_action_probability=2.0)


def test_a_siglip_directory_works_too(tmp_path):
    """Any contrastive image-text model by path: a tiny SigLIP (texts padded to a fixed length, no end token)."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = tiny_clip_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(small, vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    config = SiglipConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=16))
    SiglipModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    rewards = RewardSet.from_specs([f"clip:1:model={tmp_path},frame=current"], RewardContext(env_id=GRID))
    frames = np.stack([np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)])
    completions = [SimpleNamespace(text="up", action=0)] * 2
    result = rewards({"image": frames, "text": ("", "")}, completions, [{}, {}], env_rewards=np.zeros(2),
                     terminated=np.zeros(2, bool))  # fmt: skip
    assert result.total.shape == (2,) and np.all(result.total <= 1.0)


def test_a_policy_preset_is_not_taken_for_a_clip():
    from agents.errors import ConfigError
    from rewards.clip import load_clip

    with pytest.raises(ConfigError, match=r"'tiny' is neither a preset \(tiny-clip\)"):
        load_clip("tiny")
