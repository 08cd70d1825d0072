"""PSO's pieces beyond its objective (Miao et al., 2024, "Tuning Timestep-Distilled Diffusion Model
Using Pairwise Sample Optimization"), kept together:

- :mod:`.references`: offline PSO's reference images, sampled once from the initial model and cached;
- :mod:`.online`: online PSO's sampled step (the policy's own few-step samples, scored by a reward,
  with per-transition log-probabilities) and its held-out measures (reward gain, win rate).

The objectives themselves live with the other methods in :mod:`diffalign.trainers.objectives.pso`.
"""
