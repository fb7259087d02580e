// The math of the divergence family (docs/math.md), written once for every kernel.
//
// Notation for one row of the vocabulary, at temperature T:
//   a = student_logits / T,  b = teacher_logits / T
//   la = a - lse(a) = log q   (student log-probabilities)
//   lb = b - lse(b) = log p   (teacher log-probabilities)
//
// Every divergence d(p, q) is a sum over the vocabulary of an element term. Its gradient with
// respect to a (and b) goes through the softmax Jacobian:
//   dd/da_j = q_j * (gq_j - Gq),   Gq = sum_k q_k * gq_k
//   dd/db_j = p_j * (gp_j - Gp),   Gp = sum_k p_k * gp_k
// where gq = dd/dq and gp = dd/dp treat q and p as free variables. The products are guarded so
// that entries with zero probability contribute exactly 0 (0 * log 0 = 0, never NaN).
//
// The code is generic over a math-traits type M (see ScalarMath below; the CPU kernel supplies
// one over at::vec::Vectorized), so the CPU and CUDA kernels share these formulas and the CPU
// tests exercise the same expressions the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDCORE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDCORE_HOST_DEVICE inline
#endif

namespace kdcore {

// Codes shared with kdcore/divergences.py; the Python side passes them to the ops.
enum class Divergence : int64_t {
  ForwardKL = 0,  // KL(p || q)
  ReverseKL = 1,  // KL(q || p)
  JSD = 2,        // beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
  SkewKL = 3,     // KL(p || alpha p + (1 - alpha) q)
  SkewRKL = 4,    // KL(q || alpha q + (1 - alpha) p)
  TVD = 5,        // 1/2 sum |p - q|
};
constexpr int64_t kNumDivergences = 6;

enum class Reduction : int64_t { None = 0, Sum = 1, BatchMean = 2 };

// Scalar math traits, usable on host and device.
template <typename T>
struct ScalarMath {
  using V = T;
  static KDCORE_HOST_DEVICE V splat(T x) { return x; }
  static KDCORE_HOST_DEVICE V exp(V x) { return ::exp(x); }
  static KDCORE_HOST_DEVICE V log(V x) { return ::log(x); }
  static KDCORE_HOST_DEVICE V log1p(V x) { return ::log1p(x); }
  static KDCORE_HOST_DEVICE V abs(V x) { return ::fabs(x); }
  static KDCORE_HOST_DEVICE V max(V a, V b) { return ::fmax(a, b); }
  // keep(gt(a, b), x) == (a > b ? x : 0); the value not kept may be NaN or inf.
  static KDCORE_HOST_DEVICE bool gt(V a, V b) { return a > b; }
  static KDCORE_HOST_DEVICE V keep(bool mask, V x) { return mask ? x : V(0); }
};

// Per-launch constants of a divergence, broadcast to the math type once per row block.
template <typename V>
struct DivergenceConstants {
  V zero, half, one;
  V mix;         // jsd: beta; skew_kl / skew_rkl: alpha; unused otherwise
  V one_minus_mix;
  V tiny;        // the smallest normal number: the floor of a probability used as a divisor
};

template <class M, typename T>
KDCORE_HOST_DEVICE DivergenceConstants<typename M::V> make_constants(T mix) {
  return {M::splat(T(0)), M::splat(T(0.5)), M::splat(T(1)), M::splat(mix), M::splat(T(1) - mix),
          M::splat(std::numeric_limits<T>::min())};
}

// a / b through M::div when the math traits define one (a GPU kernel's fast division, exact to
// ~2 ulp for the normal divisors used here), else the type's own division.
template <class M, class = void>
struct HasDiv : std::false_type {};
template <class M>
struct HasDiv<M, std::void_t<decltype(M::div(std::declval<typename M::V>(), std::declval<typename M::V>()))>>
    : std::true_type {};

template <class M, typename V>
KDCORE_HOST_DEVICE V divide(V a, V b) {
  if constexpr (HasDiv<M>::value) {
    return M::div(a, b);
  } else {
    return a / b;
  }
}

// w (y - x) / x with x floored at the smallest normal number: never overflows (a denormal x would
// send the ratio to inf and the term to NaN), and an entry that small is multiplied by x again
// wherever it counts, so the floor changes nothing measurable.
template <class M, typename V>
KDCORE_HOST_DEVICE V relative_gap(V x, V y, V w, const DivergenceConstants<V>& c) {
  return divide<M>(w * (y - x), M::max(x, c.tiny));
}

template <typename V>
struct ElementTerms {
  V term;  // contribution to d
  V qgq;   // q * gq, summed into Gq
  V pgp;   // p * gp, summed into Gp
  V gq;    // dd/dq (only meaningful where q > 0)
  V gp;    // dd/dp (only meaningful where p > 0)
};

// x > 0 ? x * y : 0 -- the guarded product that makes 0 * log 0 and 0 * (-inf) vanish.
template <class M, typename V>
KDCORE_HOST_DEVICE V guarded_mul(V x, V y, const DivergenceConstants<V>& c) {
  return M::keep(M::gt(x, c.zero), x * y);
}

// The softmax Jacobian applied to a free derivative: prob * (g - G), formed as in torch's
// softmax backward so the cancellation in g - G happens before the multiplication.
template <class M, typename V>
KDCORE_HOST_DEVICE V softmax_grad(V prob, V g, V g_sum, const DivergenceConstants<V>& c) {
  return guarded_mul<M>(prob, g - g_sum, c);
}

// Each divergence supplies terms() and the gradients through the softmax Jacobian,
//   student_grad = dd/da = q (gq - Gq),   teacher_grad = dd/db = p (gp - Gp),
// using a closed form where the free derivative would divide by a probability.
template <Divergence D>
struct DivergenceTraits;

template <>
struct DivergenceTraits<Divergence::ForwardKL> {
  // d, Gq and Gp follow from the first pass's online sums (see kl_cross_term).
  static constexpr bool kNeedsRowSums = false;
  static constexpr bool kReadsLogProbs = true;  // terms() uses la and lb
  template <class M, typename V>
  static KDCORE_HOST_DEVICE ElementTerms<V> terms(V la, V lb, V q, V p, const DivergenceConstants<V>& c) {
    (void)q;
    const V gp = lb - la;
    const V term = guarded_mul<M>(p, gp, c);
    return {term, c.zero - p, term, c.zero, gp};  // Gq = -1, Gp = d
  }
  template <class M, typename V>
  static KDCORE_HOST_DEVICE V student_grad(const ElementTerms<V>&, V q, V p, V, const DivergenceConstants<V>&) {
    return q - p;
  }
  template <class M, typename V>
  static KDCORE_HOST_DEVICE V teacher_grad(const ElementTerms<V>& e, V, V p, V g_sum, const DivergenceConstants<V>& c) {
    return softmax_grad<M>(p, e.gp, g_sum, c);
  }
};

template <>
struct DivergenceTraits<Divergence::ReverseKL> {
  static constexpr bool kNeedsRowSums = false;
  static constexpr bool kReadsLogProbs = true;
  template <class M, typename V>
  static KDCORE_HOST_DEVICE ElementTerms<V> terms(V la, V lb, V q, V p, const DivergenceConstants<V>& c) {
    (void)p;
    const V gq = la - lb;
    const V term = guarded_mul<M>(q, gq, c);
    return {term, term, c.zero - q, gq, c.zero};  // Gq = d, Gp = -1
  }
  template <class M, typename V>
  static KDCORE_HOST_DEVICE V student_grad(const ElementTerms<V>& e, V q, V, V g_sum, const DivergenceConstants<V>& c) {
    return softmax_grad<M>(q, e.gq, g_sum, c);
  }
  template <class M, typename V>
  static KDCORE_HOST_DEVICE V teacher_grad(const ElementTerms<V>&, V q, V p, V, const DivergenceConstants<V>&) {
    return p - q;
  }
};

// The divergences whose gradients both go through the Jacobian with row sums from pass 2.
struct JacobianGradients {
  static constexpr bool kNeedsRowSums = true;
  static constexpr bool kReadsLogProbs = false;  // terms() need only the probabilities
  template <class M, typename V>
  static KDCORE_HOST_DEVICE V student_grad(const ElementTerms<V>& e, V q, V, V g_sum, const DivergenceConstants<V>& c) {
    return softmax_grad<M>(q, e.gq, g_sum, c);
  }
  template <class M, typename V>
  static KDCORE_HOST_DEVICE V teacher_grad(const ElementTerms<V>& e, V, V p, V g_sum, const DivergenceConstants<V>& c) {
    return softmax_grad<M>(p, e.gp, g_sum, c);
  }
};

// log(x / (w y + (1 - w) x)) = -log1p(w (y - x) / x), for x > 0: exactly 0 when y = x and
// accurate when they are close -- the regime of a student that has learned its teacher -- where
// log(mixture) - log(x) would cancel to an ulp of the logs.
template <class M, typename V>
KDCORE_HOST_DEVICE V log_ratio_to_mixture(V x, V y, V w, const DivergenceConstants<V>& c) {
  return c.zero - M::log1p(relative_gap<M>(x, y, w, c));
}

template <>
struct DivergenceTraits<Divergence::JSD> : JacobianGradients {
  template <class M, typename V>
  static KDCORE_HOST_DEVICE ElementTerms<V> terms(V la, V lb, V q, V p, const DivergenceConstants<V>& c) {
    (void)la;
    (void)lb;
    // m = beta p + (1 - beta) q;  gq = (1 - beta) log(q / m),  gp = beta log(p / m)
    const V gq = c.one_minus_mix * log_ratio_to_mixture<M>(q, p, c.mix, c);
    const V gp = c.mix * log_ratio_to_mixture<M>(p, q, c.one_minus_mix, c);
    const V qgq = guarded_mul<M>(q, gq, c), pgp = guarded_mul<M>(p, gp, c);
    return {qgq + pgp, qgq, pgp, gq, gp};
  }
};

template <>
struct DivergenceTraits<Divergence::SkewKL> : JacobianGradients {
  template <class M, typename V>
  static KDCORE_HOST_DEVICE ElementTerms<V> terms(V la, V lb, V q, V p, const DivergenceConstants<V>& c) {
    (void)la;
    (void)lb;
    // r = alpha p + (1 - alpha) q;  log(p / r) = -log1p(z),  p / r = 1 / (1 + z),
    // z = (1 - alpha)(q - p) / p. With alpha = 0 and q = 0 the divergence is +inf and says so.
    const V z = relative_gap<M>(p, q, c.one_minus_mix, c);
    const V log_ratio = c.zero - M::log1p(z);
    const V p_over_r = M::keep(M::gt(p, c.zero), divide<M>(c.one, c.one + z));
    const V term = guarded_mul<M>(p, log_ratio, c);
    const V gq = c.zero - c.one_minus_mix * p_over_r, gp = log_ratio - c.mix * p_over_r;
    return {term, q * gq, guarded_mul<M>(p, gp, c), gq, gp};
  }
};

template <>
struct DivergenceTraits<Divergence::SkewRKL> : JacobianGradients {
  template <class M, typename V>
  static KDCORE_HOST_DEVICE ElementTerms<V> terms(V la, V lb, V q, V p, const DivergenceConstants<V>& c) {
    (void)la;
    (void)lb;
    // r = alpha q + (1 - alpha) p;  log(q / r) = -log1p(z),  q / r = 1 / (1 + z),
    // z = (1 - alpha)(p - q) / q.
    const V z = relative_gap<M>(q, p, c.one_minus_mix, c);
    const V log_ratio = c.zero - M::log1p(z);
    const V q_over_r = M::keep(M::gt(q, c.zero), divide<M>(c.one, c.one + z));
    const V term = guarded_mul<M>(q, log_ratio, c);
    const V gq = log_ratio - c.mix * q_over_r, gp = c.zero - c.one_minus_mix * q_over_r;
    return {term, guarded_mul<M>(q, gq, c), p * gp, gq, gp};
  }
};

template <>
struct DivergenceTraits<Divergence::TVD> : JacobianGradients {
  template <class M, typename V>
  static KDCORE_HOST_DEVICE ElementTerms<V> terms(V la, V lb, V q, V p, const DivergenceConstants<V>& c) {
    (void)la;
    (void)lb;
    const V diff = p - q;
    // sign(p - q), with sign(0) = 0 (the subgradient kdcore uses)
    const V sign = M::keep(M::gt(diff, c.zero), c.one) - M::keep(M::gt(c.zero, diff), c.one);
    const V gp = c.half * sign, gq = c.zero - gp;
    return {c.half * M::abs(diff), q * gq, p * gp, gq, gp};
  }
};

// Cross term of the KL divergences, summed in the pass that computes the exp-sums: e * (x - y)
// with x, y the scaled logits shifted by their row maxima and e = exp(x). Divided by the exp-sum
// it is E[x - y] under that softmax, so with S the shifted exp-sums
//   KL(p || q) = E_p[(b - max b) - (a - max a)] - log S_b + log S_a
// needs no pass of its own, and the maxima cancel exactly however large the logits are.
// A zero-probability entry contributes 0 even where x - y is NaN.
template <class M, typename V>
KDCORE_HOST_DEVICE V kl_cross_term(V e, V x, V y, const DivergenceConstants<V>& c) {
  return guarded_mul<M>(e, x - y, c);
}

// The Jacobian sums (Gq, Gp) of the KL divergences, known once d is known.
template <typename T>
struct JacobianSums {
  T gq, gp;
};

template <typename T>
KDCORE_HOST_DEVICE JacobianSums<T> kl_jacobian_sums(Divergence div, T d) {
  return div == Divergence::ForwardKL ? JacobianSums<T>{T(-1), d} : JacobianSums<T>{d, T(-1)};
}

// Scale factors applied to the divergence and its gradient (docs/math.md, "Scaling").
template <typename T>
struct LossScales {
  T kd_loss;  // multiplies d in the loss: kd_weight * (T^2 if t2_scale)
  T kd_grad;  // multiplies dd/da in dLoss/dlogits: kd_weight * (T if t2_scale else 1/T)
};

template <typename T>
KDCORE_HOST_DEVICE LossScales<T> loss_scales(T temperature, bool t2_scale, T kd_weight) {
  return t2_scale ? LossScales<T>{kd_weight * temperature * temperature, kd_weight * temperature}
                  : LossScales<T>{kd_weight, kd_weight / temperature};
}

}  // namespace kdcore
