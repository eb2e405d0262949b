"""The engine: one mini-batch in, its `GradientMoments` out.

`gradients` (batch and per-example gradients by jacobian, vectorized_map or a loop),
`moments` (the moments by any method, micro-batch accumulation), `fields` (the moments'
type and how each field merges), `layerwise` (finds each variable's ops in the traced
step), `rules/` (one module per op family), `forms` (per-example gradients in their cheap
forms, the Projector), `hessian` (Hessian-vector products, Hutchinson, MC-GGN, Lanczos),
`replicas` (the global batch across replicas). It imports nothing of the instruments, the
loop, fit, the app or the run's configuration.
"""
