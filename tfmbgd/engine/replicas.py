"""The global batch across replicas: its shares, and their moments merged into the global batch's.

The pitfall this module exists for: under a strategy every replica sees only its share of
the batch. If each replica takes the `reduce_mean` of its own per-example losses and the
replicas' gradients are then summed (as tf.distribute and Keras optimizers do), the step
is R times too large with R replicas; and a short batch, split unevenly, weighs its
examples unequally. Here the batch size is always the *global* batch B, and

- each replica scales the sum of its per-example losses by 1/B
  (`tf.nn.compute_average_loss(..., global_batch_size=B)`), so the summed gradients are
  exactly the gradient of the mean loss over the global batch. The per-example losses are
  plain functions (`tfmbgd.losses`), not `keras.losses.Loss` objects: those already divide
  their batch mean by R under a strategy, and scaling them again would divide twice.
- the gradient moments of each replica's share are merged into those of the global batch
  field by field as `tfmbgd.engine.fields.MERGES` says, as `tfmbgd.engine.fields.combine` merges
  micro-batches: `B * mean = sum_r b_r mean_r` and `sum_sq` summed over replicas
  (all-reduce), per-example norms, losses and outputs gathered in order. Every statistic
  is then that of the global batch, as on one device.
- B need not be a multiple of R. Every replica gets `ceil(B / R)` rows; the last ones are
  filled with copies of real examples whose weight is 0. A weight of 0 makes their loss,
  gradient and moments exactly zero, and they are cut from the gathered per-example
  values, so the average stays the one over the B real examples.

Every worker draws the same global batches (same seed), and replica r of R takes rows
`r * ceil(B/R)` onwards: the same examples in the same order as one device, so one device
and R replicas train the same model up to float rounding.
"""

import math
from typing import NamedTuple

import tensorflow as tf

from tfmbgd.engine import fields as moments_lib
from tfmbgd.engine.gradients import dense_gradients
from tfmbgd.engine.moments import gradient_moments
from tfmbgd.losses import weighted


class Unsummed(NamedTuple):
    """Gradients still to be summed over replicas: `per_replica[i]` holds each replica's
    gradient of variable i. Keras optimizers sum them as they apply them, so a plain step
    needs no all-reduce of its own (see `tfmbgd.loop.update.optimizer_update`)."""

    per_replica: list
    strategy: tf.distribute.Strategy

    def summed(self):
        """The all-reduced gradients (cross-replica context)."""
        return [self.strategy.reduce("SUM", g, axis=None) for g in self.per_replica]


class Replicas:
    """How the replicas of `strategy` share one global batch, and how their results merge."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.count = strategy.num_replicas_in_sync

    def share(self, batch):
        """Rows per replica for a global batch of `batch` examples (the last may be padding)."""
        return -(-batch // self.count)

    def run(self, fn, x, y):
        """Calls `fn(x_r, y_r, w_r)` in every replica on its share of the global batch.

        `w_r` is 1 for real examples and 0 for padding. Returns what `fn` returns, per replica.
        """
        batch, share = x.shape[0], self.share(x.shape[0])
        rows = tf.range(self.count * share)
        weights = tf.reshape(tf.cast(rows < batch, tf.float32), [self.count, share])
        if self.count * share == batch:
            split = lambda t: tf.reshape(t, [self.count, share, *t.shape[1:]])
        else:                           # padding: copies of real examples, weight 0
            split = lambda t: tf.reshape(tf.gather(t, rows % batch), [self.count, share, *t.shape[1:]])

        def replica(xs, ys, ws):
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            return fn(xs[r], ys[r], ws[r])
        return self.strategy.run(replica, (split(x), split(y), weights))

    def sum(self, value):
        """All-reduce: the sum over replicas of a per-replica tensor."""
        return self.strategy.reduce("SUM", value, axis=None)

    def mean(self, value):
        return self.strategy.reduce("MEAN", value, axis=None)

    def gather(self, values, batch):
        """The replicas' per-example tensors in global-batch order, padding cut off."""
        return tf.nest.map_structure(lambda v: self.strategy.gather(v, axis=0)[:batch], values)

    def gradients(self, model, loss_fn, x, y, reduction="mean"):
        """One backward pass per replica on its share of the global batch `(x, y)`.

        Returns `(grads, finite, per_example_losses, outputs)`: `grads` an `Unsummed` of the
        replicas' gradients, whose sum is the gradient of the mean (or, with `reduction`
        "sum", the summed) loss over all B examples; `finite` `[V]` whether each summed
        gradient is finite (one small all-reduce, so every replica decides alike); the
        losses `[B]` and outputs `[B, ...]` in batch order.
        """
        batch, variables = x.shape[0], model.trainable_variables

        def replica(x, y, w):
            with tf.GradientTape() as tape:
                outputs = model(x, training=True)
                per_example = loss_fn(y, outputs)
                if reduction == "sum":
                    loss = tf.reduce_sum(per_example * tf.cast(w, per_example.dtype))
                else:
                    # The sum of this share's losses over the *global* B: summed across
                    # replicas, the gradients are those of the mean over the global batch.
                    loss = tf.nn.compute_average_loss(per_example, sample_weight=w, global_batch_size=batch)
            grads = dense_gradients(variables, tape.gradient(loss, variables))
            bad = tf.stack([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in grads])
            return grads, bad, per_example, outputs
        grads, bad, per_example, outputs = self.run(replica, x, y)
        per_example, outputs = self.gather((per_example, outputs), batch)
        return Unsummed(grads, self.strategy), tf.equal(self.sum(bad), 0), per_example, outputs

    def moments(self, model, loss_fn, x, y, method="auto", elementwise=True, two_batch=False):
        """The `GradientMoments` of the global batch, and, with `two_batch`, the mean over
        replicas of the squared norm of each replica's mean gradient (`|G_b|^2`, for
        `tfmbgd.instruments.noise_scale.two_batch_terms`; None without `two_batch`, or when
        the replicas' shares are uneven or there is one replica)."""
        batch = x.shape[0]
        two_sizes = two_batch and batch % self.count == 0 and self.count > 1

        layout = {}        # the packed fields' structure, recorded when the replica is traced

        def replica(x, y, w):
            weighted_loss, packed = weighted(loss_fn, y, w)
            m = gradient_moments(model, weighted_loss, x, packed, method, elementwise)
            added, joined = moments_lib.pack(m)         # merged as moments_lib.MERGES says
            spec = lambda t: tf.TensorSpec(t.shape, t.dtype)
            layout["added"], layout["joined"] = (tf.nest.map_structure(spec, f) for f in (added, joined))
            # One all-reduce for everything that adds up and one gather for the per-example
            # vectors (norms, losses; float64 holds float32 exactly): fewer, larger transfers.
            leaves = tf.nest.flatten(joined)
            vectors = [tf.cast(t, tf.float64) for t in leaves if t.shape.rank == 1]
            out = dict(sums=moments_lib.flatten(tf.nest.flatten(added)),
                       vectors=tf.stack(vectors, axis=1),
                       others=[t for t in leaves if t.shape.rank != 1])
            if two_sizes:
                out["mean_sq"] = tf.add_n([tf.reduce_sum(tf.square(g)) for g in m.mean])
            return out
        parts = self.run(replica, x, y)
        vectors, others = self.gather((parts["vectors"], parts["others"]), batch)
        width = sum(s.shape.rank == 1 for s in tf.nest.flatten(layout["joined"]))
        columns = iter(tf.unstack(tf.reshape(vectors, [batch, width]), axis=1))
        others = iter(others)
        joined = tf.nest.pack_sequence_as(layout["joined"], [
            tf.cast(next(columns), s.dtype) if s.shape.rank == 1 else next(others)
            for s in tf.nest.flatten(layout["joined"])])
        specs = tf.nest.flatten(layout["added"])
        summed = moments_lib.unflatten(self.sum(parts["sums"]), specs)
        added = tf.nest.pack_sequence_as(layout["added"], summed)
        m = moments_lib.unpack(added, joined, batch)
        return m, (self.mean(parts["mean_sq"]) if two_sizes else None)


# Moments merged inside a replica (Keras' train_step): one all-reduce of the sums, one
# all-gather of the per-example rows. Outputs are not merged: no statistic reads them.

def flat_for_merge(m):
    """One replica's `GradientMoments` as `(sums, rows)`: the fields that add up over the
    replicas (`tfmbgd.engine.fields.pack`: B_r * mean, sum_sq) in one vector, and the per-example
    squared norms and losses as the columns of `[B_r, V + 1]` rows."""
    added, _ = moments_lib.pack(m)
    sums = moments_lib.flatten([tf.cast(t, tf.float32)
                                for t in added["mean"] + (added.get("sum_sq") or [])])
    rows = tf.stack([tf.cast(t, tf.float32) for t in [*m.var_norms_sq, m.losses]], axis=1)
    return sums, rows


def zeros_for_merge(variables, elementwise, batch):
    """`flat_for_merge`'s shapes, all zeros: what a plain step sends to the merge."""
    size = sum(math.prod(tuple(v.shape)) for v in variables) * (2 if elementwise else 1)
    return tf.zeros([size], tf.float32), tf.zeros([batch, len(variables) + 1], tf.float32)


def merge_flat(ctx, sums, rows, variables, elementwise):
    """In replica context `ctx`: the `GradientMoments` of the global batch (outputs None)
    from every replica's `flat_for_merge`, the same in every replica."""
    count = len(variables)
    sums = ctx.all_reduce("SUM", sums)
    rows = tf.reshape(ctx.all_gather(rows, axis=0), [-1, count + 1])     # the gather loses the width
    batch = tf.shape(rows)[0]
    shapes = list(variables) * (2 if elementwise else 1)
    parts = [tf.cast(t, v.dtype) for t, v in zip(moments_lib.unflatten(sums, shapes), shapes)]
    return moments_lib.GradientMoments(
        mean=[p / tf.cast(batch, p.dtype) for p in parts[:count]], sum_sq=parts[count:] or None,
        var_norms_sq=tf.unstack(rows[:, :count], axis=1), losses=rows[:, count], outputs=None,
        batch_size=batch)
