"""Online methods: the policy samples its own images, a reward orders them, the loss sees log-probs.

Online PSO (Miao et al., 2024, "Tuning Timestep-Distilled Diffusion Model Using Pairwise
Sample Optimization"): per prompt, two few-step samples from the *current* policy (no
gradient), decoded and scored by ``reward(images, prompts) -> scores``; the winner goes
first. Then every stochastic transition of both chains is re-scored under the policy
(with gradient) and the reference (without), and the Objective gets their negative
log-probabilities [G, 2, S] with the rewards [G, 2] as label scores. Each group's chains
come from generators seeded by the group's own noise seed, so accumulation, process
splits and resume see the same samples, as for data methods.
"""

from __future__ import annotations

from typing import Any, Callable

import PIL.Image
import torch
from torch import Tensor, nn

from diffalign.backbones import Backbone
from diffalign.data import derive_seed
from diffalign.prediction import Predictor
from diffalign.sampling import FewStepSampler, LogProbReduction, sampling_conditioning, to_pil

from ..objectives import Objective, ObjectiveOutput, implicit_accuracy

Reward = Callable[[list[PIL.Image.Image], list[str]], Any]  # -> [N] scores, higher is better
SAMPLES_PER_PROMPT = 2


def resolve_reward(method: Any, reward: Reward | None) -> Reward:
    """The reward a caller passed, or the built-in toy reward; scorers are resolved by the caller (the CLI)."""
    if reward is not None:
        return reward
    if method.reward == "toy":
        from diffalign.toy.reward import toy_reward

        return toy_reward
    raise ValueError(
        f"method.reward={method.reward!r} is a scorer: run through `diffalign train` (which loads it from "
        "diffalign.scorers) or pass reward=... to diffalign.trainers.loop.train"
    )


def reward_scores(reward: Reward, images: list[PIL.Image.Image], prompts: list[str]) -> Tensor:
    """Call the reward and check it returned one finite score per image."""
    scores = torch.as_tensor(reward(images, prompts), dtype=torch.float32).detach().cpu().flatten()
    if scores.numel() != len(images) or not torch.isfinite(scores).all():
        raise ValueError(f"the reward returned {scores.numel()} scores for {len(images)} images (or a non-finite one): {scores.tolist()}")
    return scores


class SampledStep:
    """One micro-batch of prompts -> two policy samples each -> rewards -> the Objective on log-probs."""

    def __init__(
        self, backbone: Backbone, objective: Objective, method: Any, resolution: int, reward: Reward, weight_dtype: torch.dtype | None
    ) -> None:
        self.backbone = backbone
        self.objective = objective
        self.resolution = resolution
        self.reward = reward
        self.weight_dtype = weight_dtype
        self.reduction = method.log_prob_reduction
        # Trailing DDIM spacing: 4 steps of a distilled model land on its timesteps 999/749/499/249.
        self.sampler = FewStepSampler(backbone.noise, num_steps=method.num_steps, eta=method.eta)
        if not self.sampler.stochastic.any():
            raise ValueError("online PSO needs at least one stochastic sampler step (num_steps >= 2, eta > 0)")

    def __call__(self, policy: nn.Module, reference: Predictor | None, batch: dict) -> ObjectiveOutput:
        if reference is None:
            raise ValueError("online PSO needs a reference model but none was built")
        prompts: list[str] = list(batch["prompts"])
        g, k = len(prompts), SAMPLES_PER_PROMPT
        flat_prompts = prompts * k  # K-major: all first samples, then all second samples
        conditioning = sampling_conditioning(self.backbone, flat_prompts, self.resolution)
        generators = [torch.Generator().manual_seed(derive_seed("online", seed, i)) for i in range(k) for seed in batch["noise_seeds"]]
        trajectory = self.sampler.sample(
            self.backbone, policy, conditioning, self.backbone.latent_shape(self.resolution), generators, self.weight_dtype
        )
        with torch.no_grad():
            images = to_pil(self.backbone.decode_latents(trajectory.final))
        rewards = reward_scores(self.reward, images, flat_prompts).reshape(k, g).transpose(0, 1)  # [G, K]
        order = torch.argsort(rewards, dim=1, descending=True, stable=True)  # winner first
        policy_logp = self.sampler.transition_log_probs(
            self.backbone, policy, trajectory, conditioning, dtype=self.weight_dtype, reduction=self.reduction
        )
        reference_logp = self.sampler.transition_log_probs(
            self.backbone, reference, trajectory, conditioning, dtype=self.weight_dtype, reduction=self.reduction
        )
        policy_nll = _groups(-policy_logp, g, k, order)
        reference_nll = _groups(-reference_logp, g, k, order).detach()
        output = self.objective(policy_nll, reference_nll, torch.gather(rewards, 1, order).to(policy_nll.dtype))
        output.loss = output.loss.float()
        return output


def _groups(values: Tensor, g: int, k: int, order: Tensor) -> Tensor:
    """[K*G, S] K-major -> [G, K, S], each group's samples reordered best first."""
    grouped = values.reshape(k, g, -1).transpose(0, 1)
    index = order.to(grouped.device)[:, :, None].expand_as(grouped)
    return torch.gather(grouped, 1, index)


@torch.no_grad()
def heldout_online(
    backbone: Backbone,
    policy: nn.Module,
    reference: nn.Module,
    prompts: list[str],
    reward: Reward,
    resolution: int,
    num_steps: int = 4,
    eta: float = 1.0,
    seeds_per_prompt: int = 8,
    seed: int = 1234,
    reduction: LogProbReduction = "mean",
) -> dict[str, float]:
    """Held-out measures of an online method, on seeds training never drew.

    * ``implicit_acc``: two chains per (prompt, seed) sampled from the *reference*, ordered by the
      reward; correct when the policy raises the winner's summed transition log-ratio
      log π_θ/π_ref above the loser's (ties half; exactly 0.5 when policy = reference).
    * ``reward_policy`` / ``reward_reference``: mean reward of one sample per (prompt, seed) from each
      model, the same seed for both; ``reward_win_rate``: how often the policy's sample scores higher.
    """
    sampler = FewStepSampler(backbone.noise, num_steps=num_steps, eta=eta)
    flat = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = [derive_seed("heldout-online", seed, i) for i in range(len(flat))]
    conditioning = sampling_conditioning(backbone, flat + flat, resolution)
    generators = [torch.Generator().manual_seed(derive_seed(s, k)) for k in range(2) for s in seeds]
    trajectory = sampler.sample(backbone, reference, conditioning, backbone.latent_shape(resolution), generators)
    rewards = reward_scores(reward, to_pil(backbone.decode_latents(trajectory.final)), flat + flat).reshape(2, -1)
    log_ratio = (
        sampler.transition_log_probs(backbone, policy, trajectory, conditioning, reduction=reduction)
        - sampler.transition_log_probs(backbone, reference, trajectory, conditioning, reduction=reduction)
    ).sum(dim=1).reshape(2, -1).cpu()
    winner_first = rewards[0] >= rewards[1]
    gap = torch.where(winner_first, log_ratio[0] - log_ratio[1], log_ratio[1] - log_ratio[0])
    decided = rewards[0] != rewards[1]

    def sample_rewards(network: nn.Module) -> Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        chains = sampler.sample(backbone, network, sampling_conditioning(backbone, flat, resolution), backbone.latent_shape(resolution), generators)
        return reward_scores(reward, to_pil(backbone.decode_latents(chains.final)), flat)

    policy_rewards, reference_rewards = sample_rewards(policy), sample_rewards(reference)
    return {
        "implicit_acc": float(implicit_accuracy(-gap[decided])),  # the policy raises the winner's log-ratio
        "reward_policy": float(policy_rewards.mean()),
        "reward_reference": float(reference_rewards.mean()),
        "reward_win_rate": float(((policy_rewards > reference_rewards).double() + 0.5 * (policy_rewards == reference_rewards).double()).mean()),
    }
