"""The engine: scheduler, block manager, runner, sampler; step() and its synchronous and async fronts."""
