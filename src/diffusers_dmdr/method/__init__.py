"""The method: DMDR's math, independent of accelerate, optimizers and checkpoints. Open this package first.

- `objective.py`: what one training iteration computes (rollout, fake-score loss, generator loss, logs), given the
  training module's routes; the registry of objectives the trainer runs.
- `losses.py`: pure loss functions (DMD surrogate, fake-score denoising loss, reward hinge, anchor, RT-DM weights).
- `simulation.py`: the student's few-step sampler and the backward simulation that makes the generator's inputs.
- `denoisers.py`: a backbone seen through the scheduler as an x0 denoiser; classifier-free guidance.
- `schedules.py`: student grids, DynaRS, DynaDG, CFG jitter, as pure functions of the step.
- `draws.py`: every random number of an iteration as a function of `(seed, iteration, sample)`.
- `stages.py`: the learning rates and batch size of stage 1 and stage 2.

The modules import nothing from here; import them by their own path (`diffusers_dmdr.method.losses`).
"""
