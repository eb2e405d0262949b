"""`method="layerwise"` and `"auto"`: gradient moments from one ordinary backward pass.

How the inputs of a variable's op and the gradient at its output are obtained. The step
is traced (inside the caller's `tf.function`, or one of this module's when called
eagerly), so after the forward pass the graph holds every op that reads a trainable
variable. Each variable's resource handle is found among the graph's captures; from it the
scan follows reads, casts and reshapes to the ops that *use* the value (`MatMul`,
`Conv2D`, `Mul`, `GatherV2`, ...). Those ops' inputs are tensors of the graph; their
outputs `z` are differentiated with the variables in the same `GradientTape` call, so one
backward pass gives the batch gradient and every `dL/dz`. A per-op rule
(`tfmbgd.engine.rules`) turns an op's input and `dL/dz` into the variable's per-example
gradients in a cheap form (`tfmbgd.engine.forms`). This works the same for Sequential,
functional and subclassed models, nested layers and models, custom layers and any
activation (the gradient is taken *after* it), and changes nothing in the model. A
variable used by several ops (a layer called twice, tied weights) sums its uses'
per-example gradients before squaring, so its norms stay exact.

Rules that build per-example gradients anyway (convolutions with many output positions,
biases, normalization scales, Dense on long sequences) return their sum, the batch
gradient of that variable, and the backward pass leaves those variables out: such a
convolution's filter gradient, as costly as its per-example gradients, is never computed
(TensorFlow prunes the unused op). Where the ghost norm is cheaper (a matrix product, see
`forms.builds`; a convolution with few output positions, see `rules.conv.convolution`)
nothing per example is built and the backward pass computes the batch gradient, as a
plain step does.

On the way from a variable to its op the scan follows reads, casts and reshapes, a static
`Slice` or a `Transpose` (undone on the per-example gradients: `Step`), and elementwise ops
with values that have no batch axis (`_through`: BatchNormalization's `gamma * rsqrt(var +
eps)`, Gemma's `1 + scale`). With BatchNormalization in training mode, what the rules give
is each example's contribution (see `tfmbgd.engine.moments.gradient_moments`).

A nested function call is read when it holds one convolution (Keras compiles grouped
convolutions so: `rules.conv.called`). What it cannot see: a variable read by an op
without a rule (`rules.RULES`), by an op that mixes the examples of a batch, or inside
any other nested function call takes the exact fallback: per-example gradients of those
variables only, by B backward passes in a `tf.while_loop` (`gradients.unvectorized`; never
`tf.vectorized_map`, which can crash the process). `coverage` says which variables do, and
why.
"""

import math
import weakref
from typing import NamedTuple

import keras
import tensorflow as tf

from tfmbgd.engine import forms, gradients, rules
from tfmbgd.engine.fields import GradientMoments, batch_size_of, from_per_example
from tfmbgd.errors import UserError
from tfmbgd.models import nested_layers

# Ops a variable's value passes through unchanged in content and order.
PASS_THROUGH = {"ReadVariableOp", "Identity", "Cast", "Reshape", "ExpandDims", "Squeeze"}
# Ops that rearrange or cut a variable's value (KerasHub's position embeddings are sliced,
# attention kernels transposed before their matrix product): followed, each remembered as a
# `Step`, so that the per-example gradients of what the rule sees are mapped back.
REARRANGE = {"Slice", "Transpose"}
# Ops that read a variable without a gradient flowing back through them.
NO_GRADIENT = {"Shape", "ShapeN", "Size", "Rank", "VariableShape", "VarIsInitializedOp", "StopGradient"}


class Use(NamedTuple):
    shape: tuple              # the shape of the variable's value as the op sees it
    pending: rules.Pending
    z: tf.Tensor              # the op's output
    checks: list              # tensors whose leading axis must be B (a run-time batch size)
    op: str = ""              # the type of the op whose rule made `pending` (for `choices`)


def _handle(graph, variable):
    """The tensor of `graph` holding `variable`'s resource handle, or None if not captured.
    A graph captures the handle itself (functions, cond branches) or, nested in another
    function graph, that graph's copy of it (loop bodies)."""
    handle = variable.value.handle
    if not isinstance(graph, tf.__internal__.FuncGraph):
        return handle
    captured = {id(outside): inside for outside, inside in graph.captures}
    if id(handle) in captured:
        return captured[id(handle)]
    outer = _handle(graph.outer_graph, variable)
    return None if outer is None or outer is handle else captured.get(id(outer))


class Step(NamedTuple):
    """One rearrangement on the way from a variable to its op: its input's and output's
    shapes, and a slice's `(before, after)` pads per axis, or a transpose's permutation."""

    kind: str          # "Slice" or "Transpose"
    before: tuple      # the input's shape
    after: tuple       # the output's shape
    arg: list


def _step(op, t):
    """The `Step` of the `REARRANGE` op on the value `t`, or a reason."""
    if not t.shape.is_fully_defined() or not op.outputs[0].shape.is_fully_defined():
        return f"used by {op.type}: shape unknown until run time"
    before, after = tuple(t.shape), tuple(op.outputs[0].shape)
    if op.type == "Transpose":
        perm = tf.get_static_value(op.inputs[1])
        return "used by Transpose: a permutation known at run time" if perm is None else \
            Step("Transpose", before, after, [int(p) for p in perm])
    begin = tf.get_static_value(op.inputs[1])
    if begin is None:
        return "used by Slice: bounds known at run time"
    return Step("Slice", before, after, [(int(b), int(n - b - s)) for b, s, n in zip(begin, after, before)])


def _undone(use, steps):
    """`use` of a rearranged value as a use of the value before `steps`: its per-example
    gradients mapped back through each step, last first (a slice padded with zeros, a
    transpose inverted)."""
    def make(dz):
        g = forms.explicit(use.pending.make(dz), use.shape)
        for step in reversed(steps):
            g = tf.reshape(g, [-1, *step.after])
            if step.kind == "Slice":
                g = tf.pad(g, [[0, 0], *step.arg])
            else:
                g = tf.transpose(g, [0] + [1 + step.arg.index(i) for i in range(len(step.arg))])
        return forms.Explicit(g)
    how = ", ".join(step.kind for step in steps)
    return use._replace(shape=steps[0].before, pending=rules.Pending(forms.Explicit, make, why=_then(
        f"after {how}", use.pending.why)))


def _uses(variable, start, forward, batch, b):
    """The `Use`s of `variable` among the ops named in `forward`, from `start` (its handle, or
    a value computed from it), or why it has none we can tap."""
    uses, front = [], [(start, ())]      # (tensor, the `Step`s on the way)
    while front:
        t, steps = front.pop()
        for op in t.consumers():
            if op.name not in forward or op.type in NO_GRADIENT:
                continue
            if op.type in PASS_THROUGH:
                front.append((op.outputs[0], steps))
                continue
            if op.type in REARRANGE and op.inputs[0].name == t.name:
                step = _step(op, t)
                if isinstance(step, str):
                    return step
                front.append((op.outputs[0], steps + (step,)))
                continue
            for operand in [i for i, x in enumerate(op.inputs) if x.name == t.name]:
                found = _use(variable, op, operand, t, forward, batch, b)
                if isinstance(found, str):
                    return found
                uses += [_undone(u, steps) for u in found] if steps else found
    return uses


def _use(variable, op, operand, t, forward, batch, b):
    """The `Use`s of the value `t` through its `operand` of `op`, or a reason: by the op's rule,
    or, for an elementwise op on values without a batch axis (`_through`), by the uses of its
    result."""
    ctx = rules.Context(batch, b, tf.as_dtype(variable.dtype), [])
    shape = tuple(variable.shape) if t.dtype == tf.resource else tuple(t.shape)
    if op.type in THROUGH and t.dtype != tf.resource and _unbatched(op.outputs[0], t):
        inner = _uses(variable, op.outputs[0], forward, batch, b)
        if isinstance(inner, str):
            return inner
        return [_through(u, op, operand, shape) for u in inner]
    rule = rules.RULES.get(op.type)
    if rule is None:
        return f"used by {op.type}: no rule"
    pending = rule(op, operand, ctx)
    if isinstance(pending, str):
        return f"used by {op.type}: {pending}"
    return [Use(shape, pending, op.outputs[0] if pending.output is None else pending.output, ctx.checks,
                op.type)]


# Elementwise ops that may combine a variable with other values of no batch axis before the
# result meets the batch: BatchNormalization's `gamma * rsqrt(var + eps)` and
# `beta - mean * that`, Gemma's `1 + scale`.
THROUGH = {"Mul", "AddV2", "Add", "Sub"}


def _unbatched(z, t):
    """Whether the op's result `z` keeps the layout of the value `t` it was computed from (the
    same shape: `gamma * rsqrt(var + eps)`, `1 + scale`), so has no batch axis. (By shape,
    not by the batch size: a layer of 8 channels in a batch of 8 is still a layer.)"""
    return z.shape.is_fully_defined() and t.shape.is_fully_defined() and tuple(z.shape) == tuple(t.shape)


def _through(use, op, operand, shape):
    """`use`, a use of the result u of the elementwise `op`, as a use of its input `operand`
    (shaped `shape`): per example, the gradient with respect to u times du/dinput (the other
    factor of a product, -1 for a subtrahend, 1 for a sum), summed over the axes the input
    was broadcast along. This is example n's contribution through its own copy of the input:
    the values without a batch axis (a batch's mean and variance) stay as they are."""
    u = tuple(op.outputs[0].shape)
    other = op.inputs[1 - operand] if op.type == "Mul" else None
    sign = -1.0 if op.type == "Sub" and operand == 1 else 1.0
    padded = [1] * (len(u) - len(shape)) + list(shape)
    axes = [i + 1 for i, (p, n) in enumerate(zip(padded, u)) if p == 1 and n != 1]

    def make(dz):
        g = tf.reshape(forms.explicit(use.pending.make(dz), use.shape), [-1, *u])
        g = g * tf.cast(other, g.dtype) if other is not None else (-g if sign < 0 else g)
        g = tf.reduce_sum(g, axes, keepdims=True) if axes else g
        return forms.Explicit(tf.reshape(g, [-1, *shape]))
    inner = use.pending.why
    why = (f"through {op.type}, {inner[len('through '):]}" if inner.startswith("through ")
           else _then(f"through {op.type}", inner))
    return use._replace(shape=shape, pending=rules.Pending(forms.Explicit, make, why=why))


def _then(first, why):
    return f"{first}; {why}" if why else first


def scan(graph, variables, first_op, batch, b):
    """For each variable, its `Use`s in the ops created since `first_op`, or a reason. A
    variable the step never reads (KerasHub's untied output embedding in a backbone) has no
    uses: every example's gradient is zero."""
    forward = {op.name for op in graph.get_operations()[first_op:]}
    out = []
    for v in variables:
        handle = _handle(graph, v)
        out.append([] if handle is None else _uses(v, handle, forward, batch, b))
    return out


def _sums(uses, elementwise):
    """Whether the uses' forms build the per-example gradients (so their sum is the batch
    gradient and the backward pass can skip the variable)."""
    if {u.pending.kind for u in uses} == {forms.Rows}:
        return False
    joined = _joined_outer(uses)
    return True if joined is None else forms.builds(*joined, elementwise)


def _joined_outer(uses):
    """`(T, K, C)` of the one `Outer` that `forms.merge` makes of the uses of a variable
    (outer products of the same K and C; T None when some use's is unknown), or None."""
    if any(u.pending.kind is not forms.Outer for u in uses) or len({u.pending.dims[1:] for u in uses}) != 1:
        return None
    ts = [u.pending.dims[0] for u in uses]
    return (None if None in ts else sum(ts), *uses[0].pending.dims[1:])


def _variable_moments(v, uses, dzs, b, elementwise):
    """`(sum_sq, norms_sq, mean-or-None, parts)` of one variable from its uses' output
    gradients; `parts`: its uses' `(form, shape, scale)` for a `forms.Projector`."""
    checks = [tf.debugging.assert_equal(tf.shape(t)[0], b, message=(
        f"tfmbgd.engine.layerwise: the leading axis of {t.name} is not the batch, as its rule assumed; "
        "use method vectorized for this model and report it")) for u in uses for t in u.checks]
    with tf.control_dependencies(checks):
        made = [(u, u.pending.make(dz)) for u, dz in zip(uses, dzs) if dz is not None]
    if not made:           # no gradient reaches the variable: every g_n is zero
        zeros = tf.zeros(v.shape, v.dtype)
        return (zeros if elementwise else None), tf.zeros([b], v.dtype), zeros, []
    scale = float(b) if isinstance(b, int) else tf.cast(b, v.dtype)
    parts = [(f, u.shape, scale) for u, f in made]
    shapes = {u.shape for u, _ in made}
    form = forms.merge([f for _, f in made]) if len(shapes) == 1 else None
    shape = made[0][0].shape
    if form is None:     # uses of different kinds or shapes: sum them explicitly
        size = math.prod(v.shape)
        form = forms.Explicit(tf.add_n([forms.reshaped(forms.explicit(f, u.shape), [b, size])
                                        for u, f in made]))
        shape = (size,)
    sum_sq, norms, mean = forms.moments(form, shape, scale, elementwise)
    reshape = lambda t: None if t is None else forms.reshaped(t, v.shape)
    return reshape(sum_sq), norms, reshape(mean), parts


class Plan(NamedTuple):
    """What one trace found: per variable its uses, or why it takes the fallback."""

    uses: list       # per variable: [Use] or a reason (str)

    @property
    def fallback(self):
        return [i for i, u in enumerate(self.uses) if isinstance(u, str)]

    def coverage(self, variables):
        """`{variable.path: None, or why it takes the fallback}`."""
        return {v.path: (u if isinstance(u, str) else None) for v, u in zip(variables, self.uses)}


@tf.autograph.experimental.do_not_convert     # no tensor-dependent Python control flow here
def _traced_moments(model, loss_fn, x, y, elementwise, strict, projector=False):
    """The moments (and with `projector`, `(moments, forms.Projector)`) in the current graph."""
    graph = tf.compat.v1.get_default_graph()
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        first_op = len(graph.get_operations())
        outputs = model(x, training=True)
        losses = loss_fn(y, outputs)
        if losses.dtype in (tf.float16, tf.bfloat16):      # mixed precision: average in float32
            losses = tf.cast(losses, tf.float32)
        loss = tf.reduce_mean(losses)
    batch = losses.shape[0]
    b = batch if batch is not None else tf.shape(losses)[0]
    p = Plan(scan(graph, variables, first_op, batch, b))
    _TRACED[model] = p.coverage(variables)
    mixing = batch_norms(model)
    if mixing and p.fallback:
        raise UserError(", ".join(f"{variables[i].path} ({p.uses[i]})" for i in p.fallback)
                        + f": no rule, and the fallback's per-example gradients are not the contributions "
                        f"that {', '.join(mixing)} (BatchNormalization in training mode) call for; freeze "
                        "those layers (trainable=False) to measure this model")
    if strict and p.fallback:
        raise UserError("method layerwise has no rule for: "
                        + "; ".join(f"{variables[i].path} ({p.uses[i]})" for i in p.fallback)
                        + "; use method auto to take the exact fallback for them")
    tapped = [i for i, u in enumerate(p.uses) if not isinstance(u, str)]
    summed = {i for i in tapped if p.uses[i] and _sums(p.uses[i], elementwise)}
    asked = [i for i in range(len(variables)) if i not in summed]
    zs = [u.z for i in tapped for u in p.uses[i]]
    grads = tape.gradient(loss, [variables[i] for i in asked] + zs)
    mean = [None] * len(variables)
    for i, g in zip(asked, gradients.dense_gradients([variables[i] for i in asked], grads[:len(asked)])):
        mean[i] = g
    dzs = iter(grads[len(asked):])
    sum_sq, norms, parts = [None] * len(variables), [None] * len(variables), [[] for _ in variables]
    for i in tapped:
        v, uses = variables[i], p.uses[i]
        sum_sq[i], norms[i], rule_mean, parts[i] = _variable_moments(v, uses, [next(dzs) for _ in uses], b,
                                                                     elementwise)
        if i in summed:
            mean[i] = rule_mean
    if p.fallback:
        _fallback_moments(model, loss_fn, x, y, p.fallback, elementwise, sum_sq, norms, parts)
    m = GradientMoments(mean=mean, sum_sq=sum_sq if elementwise else None, var_norms_sq=norms,
                        losses=losses, outputs=outputs, batch_size=b)
    return (m, forms.Projector(parts, b)) if projector else m


@tf.autograph.experimental.do_not_convert
def _fallback_moments(model, loss_fn, x, y, indices, elementwise, sum_sq, norms, parts):
    """Fills `sum_sq`, `norms` and the projector's `parts` at `indices` from the per-example
    gradients of those variables only (`gradients.unvectorized`; their mean comes from the
    one backward pass)."""
    variables = model.trainable_variables
    rest = [variables[i] for i in indices]
    per_ex = gradients.unvectorized(model, loss_fn, x, y, rest)
    per_ex = per_ex._replace(gradients=[tf.cast(g, v.dtype) for g, v in zip(per_ex.gradients, rest)])
    m = from_per_example(per_ex, elementwise)     # its mean is unused: TensorFlow prunes it
    for k, i in enumerate(indices):
        norms[i] = m.var_norms_sq[k]
        sum_sq[i] = m.sum_sq[k] if elementwise else None
        parts[i] = [(forms.Explicit(per_ex.gradients[k]), tuple(rest[k].shape), 1.0)]


_COMPILED = weakref.WeakKeyDictionary()
_TRACED = weakref.WeakKeyDictionary()      # model -> the coverage its last trace found


def moments(model, loss_fn, x, y, elementwise=True, strict=False):
    """Gradient moments by the layer-wise rules, with the exact fallback for the rest.

    Works eagerly (through a `tf.function` kept per model, loss and tier) and inside a
    `tf.function`. Returns a `tfmbgd.engine.fields.GradientMoments`.

    Raises:
      UserError: `strict` (method "layerwise") and some variable has no rule.
    """
    if tf.inside_function():
        return _traced_moments(model, loss_fn, x, y, elementwise, strict)
    compiled = _COMPILED.setdefault(model, {})
    key = (loss_fn, elementwise, strict)
    if key not in compiled:
        compiled[key] = tf.function(lambda x, y: _traced_moments(model, loss_fn, x, y, elementwise, strict),
                                    autograph=False)
    m = compiled[key](x, y)
    return m._replace(batch_size=batch_size_of(m.losses))     # an int again, not a returned tensor


def coverage(model, x=None):
    """Which trainable variables the layer-wise rules cover, and why the others are not.

    Args:
      model: a Keras model whose variables exist.
      x: a batch of inputs (any batch size); may be left out for a functional or
        Sequential model, whose inputs are known.

    Returns:
      `{variable.path: None}` for variables with a rule, `{variable.path: reason}` for
      those that take the exact per-example fallback, in `model.trainable_variables` order.

    Raises:
      UserError: `x` is needed (a subclassed model) and not given.
    """
    return _plan(model, x, "coverage").coverage(model.trainable_variables)


def _plan(model, x, asker):
    """The `Plan` of one forward trace of `model` on `x` (a batch of zeros if None)."""
    if x is None:
        if getattr(model, "inputs", None) is None:
            raise UserError(f"{asker} of model {model.name}: pass a batch x (a subclassed model's "
                            "inputs are known only when it is called)")
        try:
            structure = model.input
        except AttributeError:       # a Sequential never called: its inputs as a list
            structure = model.inputs if len(model.inputs) > 1 else model.inputs[0]
        x = tf.nest.map_structure(lambda t: tf.zeros([2, *t.shape[1:]], t.dtype), structure)
    found = {}

    def trace(x):
        graph = tf.compat.v1.get_default_graph()
        first_op = len(graph.get_operations())
        model(x, training=True)
        batch = tf.nest.flatten(x)[0].shape[0]
        found["plan"] = Plan(scan(graph, model.trainable_variables, first_op, batch, batch))
        return tf.constant(0)

    tf.function(trace, autograph=False).get_concrete_function(tf.nest.map_structure(tf.convert_to_tensor, x))
    return found["plan"]


def _grams(t, k, c):
    """How `forms` takes the two Gram matrices of an `Outer` form, with the arithmetic."""
    a, d = (forms.gram_by_broadcast(t, width) for width in (k, c))
    way = lambda broadcast: "broadcast sum" if broadcast else "batched product"
    sizes = f"T^2 K = {t * t * k:,} and T^2 C = {t * t * c:,}"
    if a == d:
        return f" by {way(a)}s, {sizes} {'at most' if a else 'above'} {forms.GRAM_BY_BROADCAST:,}"
    return f": a's by {way(a)}, d's by {way(d)}, {sizes} against {forms.GRAM_BY_BROADCAST:,}"


def choices(model, x=None, elementwise=False):
    """How a statistics step measures each trainable variable, and why: the op its rule reads,
    the form of the per-example gradients and the arithmetic behind a choice between two
    (a convolution's ghost norm or per-example kernels), whether the backward pass leaves
    out the variable's batch gradient (the rule's per-example gradients sum to it), or why
    it takes the fallback.

    Args:
      model, x: as for `coverage` (the choice of a convolution depends on its output's size,
        so give inputs of the size you train on).
      elementwise: the tier asked for (a few forms choose differently for it).

    Returns:
      `{variable.path: one line}`, in `model.trainable_variables` order.
    """
    plan = _plan(model, x, "choices")
    return {v.path: _formulation(u, elementwise) for v, u in zip(model.trainable_variables, plan.uses)}


def _formulation(uses, elementwise):
    if isinstance(uses, str):
        return f"fallback, B backward passes: {uses}"
    if not uses:
        return "never read: zero for every example"
    lines = [f"{u.op}: {_how(u.pending.kind, u.pending.dims, elementwise)}"
             + (f" ({u.pending.why})" if u.pending.why else "") for u in uses]
    line = " + ".join(lines)
    joined = _joined_outer(uses)
    if len(uses) > 1 and joined is not None and joined[0] is not None:
        # forms.merge joins their positions: one form, as the moments take it
        line += f"; the {len(uses)} uses joined: {_how(forms.Outer, joined, elementwise)}"
    if _sums(uses, elementwise):
        line += "; the backward pass leaves out its batch gradient"
    return line


def _how(kind, dims, elementwise):
    if kind is forms.Outer:
        t, k, c = dims
        if t == 1:
            return "outer product a_n^T d_n: norms ||a_n||^2 ||d_n||^2"
        if forms.builds(t, k, c, elementwise):
            built = f"outer product over T={t} positions, built per example ({k}x{c})"
            if elementwise and forms.norms_by_gram(t, k, c):
                built += (f"; norms by the Gram matrices{_grams(t, k, c)}, T^2 (K + C) = "
                          f"{t * t * (k + c):,} < K C = {k * c:,}")
            return built
        joined = " in one product" if forms.joins_cross_terms(k, c) else ""
        return f"ghost norm: Gram matrices of T={t} positions{_grams(t, k, c)}" + (
            f"; elementwise sums by {t * (t + 1) // 2} cross terms{joined}" if elementwise else "")
    if kind is forms.Rows:
        return "gathered rows: segment sums per (example, row)"
    if kind is forms.Pieces:
        return "per-example gradients, reduced a kernel offset at a time"
    return "per-example gradients"


def traced_coverage(model):
    """The `coverage` that the last layer-wise trace of `model` found, or None if none ran."""
    return _TRACED.get(model)


def batch_norms(model):
    """The names of `model`'s BatchNormalization layers that train (in training mode they
    normalize by the batch's statistics, mixing its examples)."""
    return [layer.name for layer in nested_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def describe(cover, mixing=()):
    """One line for the start of a run, from a `coverage` dict: how many variables take the
    layer-wise rules, and which take the fallback and why; with `mixing` (`batch_norms`),
    what is measured then."""
    slow = {path: why for path, why in cover.items() if why is not None}
    line = f"gradient statistics: {len(cover) - len(slow)} of {len(cover)} variables by the layer-wise rules"
    if slow:
        line += ("; exact per-example fallback (B backward passes, not vectorized) for "
                 + ", ".join(f"{p} ({w})" for p, w in slow.items()))
    if mixing:
        line += (f"; BatchNormalization in training mode ({len(mixing)} layers) mixes the examples: "
                 "each example's contribution to the batch gradient is measured (see the README)")
    return line
