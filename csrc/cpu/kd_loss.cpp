// CPU kernel of the kd_loss op family (kdcore::kd_loss_cpp).
//
// One row of the vocabulary per task (at::parallel_for over rows). Logits are read in tiles of
// kTile elements, converted to the accumulation type (float; double for float64 input) and padded
// with -inf, so every vector loop runs over whole at::vec::Vectorized registers.
//
//   P1  one sweep for the softmax statistics of both rows (online: running maxima, rescaled
//       sums), e = exp(x - shift) into a per-thread stash, a NaN / +inf check, and the KL cross
//       term, which gives forward and reverse KL their d with no further pass;
//   P2  jsd / skew_kl / skew_rkl / tvd only: d and the Jacobian row sums Gq, Gp, from the stash,
//       and the free derivatives gq, gp into a second stash (their logs are taken once);
//   P3  the gradients, from the stashes (q = e_s / S_s, p = e_t / S_t), written once in the
//       logits' dtype; the logits are re-read only where log-probabilities are needed.
// Two exponentials per logit pair for every divergence (plus two log1p for jsd, one for skew). DRAM traffic: each logit is read once (the
// row then sits in L2/L3 for the later passes) and each gradient element is written once; the
// only [N, V] allocations are the gradients themselves; the stashes are 2 or 4 x V floats per thread.
//
// This file is compiled once per instruction set (default, AVX2, AVX-512) into its own Python
// module; kdcore/_ext.py loads the best one the processor supports.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kdcore/cpu_rows.h"
#include "kdcore/divergence.h"
#include "kdcore/kd_loss_host.h"
#include "kdcore/python_module.h"

namespace kdcore {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// The problem and the per-row kernel.

enum class RowError : int { None = 0, AllMasked = 1, LabelOutOfRange = 2 };

template <typename acc_t>
struct Problem {
  RowTensor<acc_t> student, teacher, grad_student, grad_teacher;
  const int64_t* labels = nullptr;  // may be null
  const bool* mask = nullptr;       // may be null
  acc_t* row_loss = nullptr;        // [N]
  int64_t n_rows = 0, vocab = 0;
  KdLossOptions opt{};
  bool inplace = false;    // grad_student is the student logits (kd_loss_cpp_inplace)
  double row_scale = 1.0;  // gradient factor: 1 / divisor for 'batchmean', else 1
  // the first failing row and why, raised after the parallel loop
  std::mutex error_mutex;
  int64_t error_row = std::numeric_limits<int64_t>::max();
  RowError error = RowError::None;

  void report(int64_t row, RowError kind) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (row < error_row) {
      error_row = row;
      error = kind;
    }
  }
};

// Per-thread buffers: converted tiles, gradient tiles, and stashes for the row in flight.
template <typename acc_t>
struct Scratch {
  Scratch(int64_t vocab, bool with_derivatives)
      : exp_student(padded<acc_t>(vocab)),
        exp_teacher(padded<acc_t>(vocab)),
        dd_dq(with_derivatives ? padded<acc_t>(vocab) : 0),
        dd_dp(with_derivatives ? padded<acc_t>(vocab) : 0),
        shift_student(tiles(vocab)),
        shift_teacher(tiles(vocab)),
        factor_student(tiles(vocab)),
        factor_teacher(tiles(vocab)) {}
  static int64_t tiles(int64_t vocab) { return (vocab + kTile - 1) / kTile; }
  alignas(64) acc_t student[kTile];
  alignas(64) acc_t teacher[kTile];
  alignas(64) acc_t grad_student[kTile];
  alignas(64) acc_t grad_teacher[kTile];
  std::vector<acc_t> exp_student, exp_teacher;        // exp(x - running max), written by P1
  std::vector<acc_t> dd_dq, dd_dp;                    // the free derivatives gq, gp, written by P2
  std::vector<acc_t> shift_student, shift_teacher;    // per tile: the running max its exps used
  std::vector<acc_t> factor_student, factor_teacher;  // per tile: exp(shift - max) / S
};

// Softmax statistics of one row pair. Each log-sum-exp is kept as (exact row maximum, log of the
// shifted sum): x - max is exact near the maximum, so x - max - log_sum loses nothing to the size
// of x, however large the logits are.
template <typename acc_t>
struct RowStats {
  acc_t max_a = 0, max_b = 0, max_1 = 0;   // maxima of a = s/T, b = t/T and s
  double log_sum_a = 0, log_sum_b = 0, log_sum_1 = 0;
  double d = 0;                            // the divergence of the row
  bool bad = false;                        // a NaN or +inf logit: the row's loss and gradient are NaN
  bool all_masked = false;                 // one of the rows is entirely -inf
};

// Log-probabilities from raw logits, given a row's statistics.
template <typename acc_t>
struct LogProbs {
  using V = Vec<acc_t>;
  V inv_t, max_a, log_sum_a, max_b, log_sum_b, max_1, log_sum_1;
  LogProbs(const RowStats<acc_t>& st, acc_t inv_temperature)
      : inv_t(inv_temperature),
        max_a(st.max_a),
        log_sum_a(static_cast<acc_t>(st.log_sum_a)),
        max_b(st.max_b),
        log_sum_b(static_cast<acc_t>(st.log_sum_b)),
        max_1(st.max_1),
        log_sum_1(static_cast<acc_t>(st.log_sum_1)) {}
  V student(const V& s) const { return (s * inv_t - max_a) - log_sum_a; }  // log q
  V teacher(const V& t) const { return (t * inv_t - max_b) - log_sum_b; }  // log p
  V student_t1(const V& s) const { return (s - max_1) - log_sum_1; }       // log softmax(s)
};

template <typename acc_t, Divergence D>
class RowKernel {
  using V = Vec<acc_t>;
  using M = VecMath<acc_t>;
  using Traits = DivergenceTraits<D>;
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  static constexpr bool kKL = D == Divergence::ForwardKL || D == Divergence::ReverseKL;

 public:
  explicit RowKernel(Problem<acc_t>& pb)
      : pb_(pb),
        inv_t_(static_cast<acc_t>(1.0 / pb.opt.temperature)),
        separate_ce_(pb.opt.ce_weight != 0.0 && pb.opt.temperature != 1.0),
        c_(make_constants<M>(static_cast<acc_t>(pb.opt.mix))) {}

  void run(int64_t row, Scratch<acc_t>& scratch) {
    const KdLossOptions& o = pb_.opt;
    const bool kept = (pb_.mask == nullptr || pb_.mask[row]) &&
                      (pb_.labels == nullptr || pb_.labels[row] != o.ignore_index);
    if (!kept) {
      pb_.row_loss[row] = 0;
      fill_gradients(row, acc_t(0));
      return;
    }
    const int64_t label = pb_.labels != nullptr ? pb_.labels[row] : -1;
    if (o.ce_weight != 0.0 && (label < 0 || label >= pb_.vocab)) {
      pb_.report(row, RowError::LabelOutOfRange);
      return;
    }
    RowStats<acc_t> st = statistics(row, scratch);
    if (st.all_masked) {
      pb_.report(row, RowError::AllMasked);
      return;
    }
    if (st.bad) {
      pb_.row_loss[row] = std::numeric_limits<acc_t>::quiet_NaN();
      fill_gradients(row, std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    JacobianSums<double> sums = kl_jacobian_sums(D, st.d);
    if constexpr (Traits::kNeedsRowSums) sums = row_sums(row, scratch, st);
    const LossScales<double> scales = loss_scales(o.temperature, o.t2_scale, o.kd_weight);
    double loss = scales.kd_loss * st.d;
    if (o.ce_weight != 0.0) {  // before the gradients, which may overwrite the logits (in place)
      alignas(64) acc_t logit[V::size()];
      const acc_t* loaded = pb_.student.load(pb_.student.at(row, label), 1, logit);
      loss += o.ce_weight * ((st.max_1 - static_cast<double>(loaded[0])) + st.log_sum_1);
    }
    if (o.student_grad || o.teacher_grad) gradients(row, scratch, st, sums, scales, label);
    pb_.row_loss[row] = static_cast<acc_t>(loss);
  }

 private:
  template <typename Body>
  void for_each_tile(int64_t row, Scratch<acc_t>& scratch, bool load_logits, Body body) {
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      const int64_t n = std::min(kTile, pb_.vocab - start);
      const acc_t* s = load_logits ? pb_.student.load(pb_.student.at(row, start), n, scratch.student) : nullptr;
      if (pb_.inplace && s != nullptr && s != scratch.student) {
        // the tile's gradient is written over these logits while they are still read: copy them
        std::copy(s, s + padded<acc_t>(n), scratch.student);
        s = scratch.student;
      }
      const acc_t* t = load_logits ? pb_.teacher.load(pb_.teacher.at(row, start), n, scratch.teacher) : nullptr;
      body(start, n, padded<acc_t>(n), s, t);
    }
  }

  // Softmax statistics accumulated while P1 sweeps a row, relative to running maxima.
  struct Running {
    acc_t max_s = -std::numeric_limits<acc_t>::infinity();  // raw logit maxima behind the shifts
    acc_t max_t = -std::numeric_limits<acc_t>::infinity();
    double sum_a = 0, sum_b = 0, sum_1 = 0;  // exp-sums of a = s/T, b = t/T and s
    double cross = 0;                        // KL cross term (kl_cross_term in divergence.h)
  };

  // The shift (in units of a = s/T) that exps use for a running maximum; 0 while the row is all
  // -inf so far, which keeps exp(-inf - shift) = 0.
  acc_t shift_of(acc_t max) const { return max == -kInf ? acc_t(0) : max * inv_t_; }

  // Raises the running maxima to at least (to_s, to_t): the sums are rescaled and the cross term
  // corrected exactly. With C = sum e_b (x_b - x_a), moving the shifts by (delta_a, delta_b) gives
  // C' = exp(-delta_b) (C - (delta_b - delta_a) S_b), mirrored for reverse KL. A sum still at
  // -inf has nothing to move (delta 0).
  void raise_maxima(Running& r, acc_t to_s, acc_t to_t) const {
    const acc_t new_s = std::max(r.max_s, to_s), new_t = std::max(r.max_t, to_t);
    if (new_s == r.max_s && new_t == r.max_t) return;
    const double delta_a = r.max_s == -kInf ? 0.0 : double(new_s * inv_t_) - double(r.max_s * inv_t_);
    const double delta_b = r.max_t == -kInf ? 0.0 : double(new_t * inv_t_) - double(r.max_t * inv_t_);
    const double delta_1 = r.max_s == -kInf ? 0.0 : double(new_s) - double(r.max_s);
    if constexpr (D == Divergence::ForwardKL) r.cross = (r.cross - (delta_b - delta_a) * r.sum_b) * std::exp(-delta_b);
    if constexpr (D == Divergence::ReverseKL) r.cross = (r.cross - (delta_a - delta_b) * r.sum_a) * std::exp(-delta_a);
    r.sum_a *= std::exp(-delta_a);
    r.sum_b *= std::exp(-delta_b);
    r.sum_1 *= std::exp(-delta_1);
    r.max_s = new_s;
    r.max_t = new_t;
  }

  struct TileSums {
    V sum_a{0}, sum_b{0}, cross{0}, max_s{-kInf}, max_t{-kInf};
  };

  // exp(x - shift) of one tile of both rows into the stash, their sums and cross term, and (free
  // here) the tile's maxima. Arguments above the shift are fine up to kMaxLead.
  TileSums tile_exponentials(const acc_t* s, const acc_t* t, int64_t nv, acc_t shift_a, acc_t shift_b, acc_t* exp_s,
                             acc_t* exp_t) const {
    const V inv_t(inv_t_), vshift_a(shift_a), vshift_b(shift_b);
    TileSums ts;
    for (int64_t j = 0; j < nv; j += V::size()) {
      const V sv = V::loadu(s + j), tv = V::loadu(t + j);
      ts.max_s = vmax(ts.max_s, sv);
      ts.max_t = vmax(ts.max_t, tv);
      const V xa = sv * inv_t - vshift_a, xb = tv * inv_t - vshift_b;
      const V ea = M::exp(xa), eb = M::exp(xb);
      ea.store(exp_s + j);
      eb.store(exp_t + j);
      ts.sum_a += ea;
      ts.sum_b += eb;
      if constexpr (D == Divergence::ForwardKL) ts.cross += kl_cross_term<M>(eb, xb, xa, c_);
      if constexpr (D == Divergence::ReverseKL) ts.cross += kl_cross_term<M>(ea, xa, xb, c_);
    }
    return ts;
  }

  // How far above its shift a tile's maximum may lie and still be exponentiated against it
  // (e^64 ~ 6e27 stays far from float overflow, even summed over a tile).
  static constexpr acc_t kMaxLead = 64;

  // P1: one sweep over the row for the softmax statistics of both rows. Each tile's exps use the
  // running maxima of the tiles before it as shifts and find the tile's own maxima on the way;
  // the stash keeps each tile relative to the shift it used, and per-tile factors
  // exp(shift - final max) / S later turn it into probabilities. Only the first tile (or one that
  // jumps more than kMaxLead above the running maximum, which it then redoes) needs a separate
  // max pass. Reading and computing in one sweep lets DRAM streaming overlap the exponentials.
  RowStats<acc_t> statistics(int64_t row, Scratch<acc_t>& scratch) {
    Running r;
    int64_t tile = 0;
    for (int64_t start = 0; start < pb_.vocab; start += kTile, ++tile) {
      const int64_t n = std::min(kTile, pb_.vocab - start), nv = padded<acc_t>(n);
      const acc_t* s = pb_.student.load(pb_.student.at(row, start), n, scratch.student);
      const acc_t* t = pb_.teacher.load(pb_.teacher.at(row, start), n, scratch.teacher);
      acc_t* exp_s = scratch.exp_student.data() + start;
      acc_t* exp_t = scratch.exp_teacher.data() + start;
      if (r.max_s == -kInf || r.max_t == -kInf) {  // no shift yet: this tile's maxima first
        V vmax_s(-kInf), vmax_t(-kInf);
        for (int64_t j = 0; j < nv; j += V::size()) {
          vmax_s = vmax(vmax_s, V::loadu(s + j));
          vmax_t = vmax(vmax_t, V::loadu(t + j));
        }
        raise_maxima(r, hmax(vmax_s), hmax(vmax_t));
      }
      TileSums ts = tile_exponentials(s, t, nv, shift_of(r.max_s), shift_of(r.max_t), exp_s, exp_t);
      const acc_t tile_max_s = hmax(ts.max_s), tile_max_t = hmax(ts.max_t);
      if (tile_max_s * inv_t_ - shift_of(r.max_s) > kMaxLead || tile_max_t * inv_t_ - shift_of(r.max_t) > kMaxLead) {
        raise_maxima(r, tile_max_s, tile_max_t);  // too far above the shift: move it, then redo
        ts = tile_exponentials(s, t, nv, shift_of(r.max_s), shift_of(r.max_t), exp_s, exp_t);
      }
      scratch.shift_student[tile] = r.max_s == -kInf ? -kInf : shift_of(r.max_s);
      scratch.shift_teacher[tile] = r.max_t == -kInf ? -kInf : shift_of(r.max_t);
      // fold the tile's lanes into double row sums: short float partial sums stay accurate
      r.sum_a += hsum(ts.sum_a);
      r.sum_b += hsum(ts.sum_b);
      r.cross += hsum(ts.cross);
      raise_maxima(r, tile_max_s, tile_max_t);
      if (separate_ce_) {  // the fused CE at T != 1 needs the exp-sum of s itself
        const V shift_1(r.max_s == -kInf ? acc_t(0) : r.max_s);
        V acc_1(0);
        for (int64_t j = 0; j < nv; j += V::size()) acc_1 += M::exp(V::loadu(s + j) - shift_1);
        r.sum_1 += hsum(acc_1);
      }
    }
    return finish_statistics(r, scratch, tile);
  }

  RowStats<acc_t> finish_statistics(const Running& r, Scratch<acc_t>& scratch, int64_t tiles) const {
    RowStats<acc_t> st;
    // A NaN or +inf logit leaves a NaN in its row's exp-sum (a NaN exp, or inf - inf).
    st.bad = std::isnan(r.sum_a) || std::isnan(r.sum_b) || std::isnan(r.sum_1);
    st.all_masked = !st.bad && (r.max_s == -kInf || r.max_t == -kInf);
    if (st.bad || st.all_masked) return st;
    st.max_a = r.max_s * inv_t_;
    st.max_b = r.max_t * inv_t_;
    st.max_1 = separate_ce_ ? r.max_s : st.max_a;
    st.log_sum_a = std::log(r.sum_a);
    st.log_sum_b = std::log(r.sum_b);
    st.log_sum_1 = separate_ce_ ? std::log(r.sum_1) : st.log_sum_a;
    for (int64_t i = 0; i < tiles; ++i) {
      scratch.factor_student[i] = static_cast<acc_t>(std::exp(double(scratch.shift_student[i]) - st.max_a) / r.sum_a);
      scratch.factor_teacher[i] = static_cast<acc_t>(std::exp(double(scratch.shift_teacher[i]) - st.max_b) / r.sum_b);
    }
    if constexpr (D == Divergence::ForwardKL) st.d = r.cross / r.sum_b - st.log_sum_b + st.log_sum_a;
    if constexpr (D == Divergence::ReverseKL) st.d = r.cross / r.sum_a - st.log_sum_a + st.log_sum_b;
    return st;
  }

  // P2 (jsd / skew_kl / skew_rkl / tvd): d, Gq = sum q*gq and Gp = sum p*gp, and gq, gp into the
  // stash for P3 -- the logs of these divergences are computed once per element.
  JacobianSums<double> row_sums(int64_t row, Scratch<acc_t>& scratch, RowStats<acc_t>& st) {
    static_assert(!Traits::kReadsLogProbs, "row sums come from probabilities alone");
    const V zero(0);
    double d = 0, gq = 0, gp = 0;
    for_each_tile(row, scratch, false, [&](int64_t start, int64_t, int64_t nv, const acc_t*, const acc_t*) {
      const int64_t i = start / kTile;
      const V factor_a(scratch.factor_student[i]), factor_b(scratch.factor_teacher[i]);
      const acc_t* exp_s = scratch.exp_student.data() + start;
      const acc_t* exp_t = scratch.exp_teacher.data() + start;
      acc_t* dd_dq = scratch.dd_dq.data() + start;
      acc_t* dd_dp = scratch.dd_dp.data() + start;
      V acc_d(0), acc_q(0), acc_p(0);
      for (int64_t j = 0; j < nv; j += V::size()) {
        const V q = V::loadu(exp_s + j) * factor_a, p = V::loadu(exp_t + j) * factor_b;
        const ElementTerms<V> e = Traits::template terms<M>(zero, zero, q, p, c_);
        e.gq.store(dd_dq + j);
        e.gp.store(dd_dp + j);
        acc_d += e.term;
        acc_q += e.qgq;
        acc_p += e.pgp;
      }
      d += hsum(acc_d);
      gq += hsum(acc_q);
      gp += hsum(acc_p);
    });
    st.d = d;
    return {gq, gp};
  }

  // Which log-probabilities a gradient reads; everything else comes from the stashes. Forward
  // KL's student gradient q - p and reverse KL's teacher gradient p - q read none.
  static constexpr bool kStudentGradReadsLogProbs = D == Divergence::ReverseKL;
  static constexpr bool kTeacherGradReadsLogProbs = D == Divergence::ForwardKL;

  // What P3 reads for one tile, as plain pointers so the loops below hold them in registers.
  struct GradientTile {
    const acc_t* exp_s;
    const acc_t* exp_t;
    const acc_t* dd_dq;  // P2 stash (row-sum divergences only)
    const acc_t* dd_dp;
    const acc_t* s;      // converted logits, when read
    const acc_t* t;
    V factor_a, factor_b;
    int64_t nv;
  };

  // One side's gradient over a tile, dd/da (student) or dd/db (teacher), times scale, into out.
  // out holds whole vectors (the output itself for whole tiles, else the padded tile buffer).
  template <bool kStudent>
  void side_gradient(const GradientTile& tile, const LogProbs<acc_t>& lp, const V& g_sum, const V& scale,
                     acc_t* out) const {
    constexpr bool kLogProbs = kStudent ? kStudentGradReadsLogProbs : kTeacherGradReadsLogProbs;
    for (int64_t j = 0; j < tile.nv; j += V::size()) {
      const V q = V::loadu(tile.exp_s + j) * tile.factor_a, p = V::loadu(tile.exp_t + j) * tile.factor_b;
      ElementTerms<V> e{};
      if constexpr (Traits::kNeedsRowSums) {
        if constexpr (kStudent) {
          e.gq = V::loadu(tile.dd_dq + j);
        } else {
          e.gp = V::loadu(tile.dd_dp + j);
        }
      } else if constexpr (kLogProbs) {
        e = Traits::template terms<M>(lp.student(V::loadu(tile.s + j)), lp.teacher(V::loadu(tile.t + j)), q, p, c_);
      }
      V g;
      if constexpr (kStudent) {
        g = Traits::template student_grad<M>(e, q, p, g_sum, c_);
      } else {
        g = Traits::template teacher_grad<M>(e, q, p, g_sum, c_);
      }
      (g * scale).store(out + j);
    }
  }

  // Adds ce_scale * softmax(s) at temperature 1 to a student gradient tile.
  void add_softmax(const GradientTile& tile, const LogProbs<acc_t>& lp, const V& ce_scale, acc_t* out) const {
    if (separate_ce_) {
      for (int64_t j = 0; j < tile.nv; j += V::size()) {
        (V::loadu(out + j) + ce_scale * M::exp(lp.student_t1(V::loadu(tile.s + j)))).store(out + j);
      }
    } else {  // T = 1: softmax(s) is q
      for (int64_t j = 0; j < tile.nv; j += V::size()) {
        (V::loadu(out + j) + ce_scale * (V::loadu(tile.exp_s + j) * tile.factor_a)).store(out + j);
      }
    }
  }

  // P3: dLoss/ds = kd_grad * q (gq - Gq) + ce_weight * (softmax(s) - onehot), and
  // dLoss/dt = kd_grad * p (gp - Gp), both times the row scale.
  void gradients(int64_t row, Scratch<acc_t>& scratch, const RowStats<acc_t>& st, const JacobianSums<double>& sums,
                 const LossScales<double>& scales, int64_t label) {
    const KdLossOptions& o = pb_.opt;
    const bool fused_ce = o.ce_weight != 0.0;
    const bool read_logits = separate_ce_ || (o.student_grad && kStudentGradReadsLogProbs) ||
                             (o.teacher_grad && kTeacherGradReadsLogProbs);
    const LogProbs<acc_t> lp(st, inv_t_);
    const V g_q(static_cast<acc_t>(sums.gq)), g_p(static_cast<acc_t>(sums.gp));
    const V kd_scale(static_cast<acc_t>(scales.kd_grad * pb_.row_scale));
    const acc_t ce_scale = static_cast<acc_t>(o.ce_weight * pb_.row_scale);
    const bool stashed_derivatives = !scratch.dd_dq.empty();
    for_each_tile(row, scratch, read_logits, [&](int64_t start, int64_t n, int64_t nv, const acc_t* s, const acc_t* t) {
      const int64_t i = start / kTile;
      const GradientTile tile{scratch.exp_student.data() + start,
                              scratch.exp_teacher.data() + start,
                              stashed_derivatives ? scratch.dd_dq.data() + start : nullptr,
                              stashed_derivatives ? scratch.dd_dp.data() + start : nullptr,
                              s,
                              t,
                              V(scratch.factor_student[i]),
                              V(scratch.factor_teacher[i]),
                              nv};
      if (o.student_grad) {
        acc_t* gs = pb_.grad_student.target(pb_.grad_student.at(row, start), n, scratch.grad_student);
        side_gradient<true>(tile, lp, g_q, kd_scale, gs);
        if (fused_ce) {
          add_softmax(tile, lp, V(ce_scale), gs);
          if (label >= start && label < start + n) gs[label - start] -= ce_scale;
        }
        pb_.grad_student.store(gs, n, pb_.grad_student.at(row, start));
      }
      if (o.teacher_grad) {
        acc_t* gt = pb_.grad_teacher.target(pb_.grad_teacher.at(row, start), n, scratch.grad_teacher);
        side_gradient<false>(tile, lp, g_p, kd_scale, gt);
        pb_.grad_teacher.store(gt, n, pb_.grad_teacher.at(row, start));
      }
    });
  }

  void fill_gradients(int64_t row, acc_t value) {
    fill_row(pb_.opt.student_grad ? &pb_.grad_student : nullptr, row, value);
    fill_row(pb_.opt.teacher_grad ? &pb_.grad_teacher : nullptr, row, value);
  }

  void fill_row(const RowTensor<acc_t>* g, int64_t row, acc_t value) {
    if (g == nullptr) return;
    acc_t buf[kTile];
    std::fill(buf, buf + kTile, value);
    for (int64_t start = 0; start < pb_.vocab; start += kTile) {
      g->store(buf, std::min(kTile, pb_.vocab - start), g->at(row, start));
    }
  }

  Problem<acc_t>& pb_;
  const acc_t inv_t_;
  const bool separate_ce_;  // fused CE at T != 1 needs its own exp-sum and softmax
  const DivergenceConstants<V> c_;
};

template <typename acc_t, Divergence D>
void run_rows(Problem<acc_t>& pb) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(pb.vocab, 1));
  at::parallel_for(0, pb.n_rows, grain, [&](int64_t begin, int64_t end) {
    RowKernel<acc_t, D> kernel(pb);
    auto scratch = std::make_unique<Scratch<acc_t>>(pb.vocab, DivergenceTraits<D>::kNeedsRowSums);
    for (int64_t row = begin; row < end; ++row) kernel.run(row, *scratch);
  });
}

template <typename acc_t>
void dispatch_divergence(Problem<acc_t>& pb) {
  switch (pb.opt.divergence) {
    case Divergence::ForwardKL:
      return run_rows<acc_t, Divergence::ForwardKL>(pb);
    case Divergence::ReverseKL:
      return run_rows<acc_t, Divergence::ReverseKL>(pb);
    case Divergence::JSD:
      return run_rows<acc_t, Divergence::JSD>(pb);
    case Divergence::SkewKL:
      return run_rows<acc_t, Divergence::SkewKL>(pb);
    case Divergence::SkewRKL:
      return run_rows<acc_t, Divergence::SkewRKL>(pb);
    case Divergence::TVD:
      return run_rows<acc_t, Divergence::TVD>(pb);
  }
}

template <typename acc_t>
void compute(Problem<acc_t>& pb, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad_s,
             const at::Tensor& grad_t) {
  pb.student = make_row_tensor<acc_t>(student);
  pb.teacher = make_row_tensor<acc_t>(teacher);
  if (pb.opt.student_grad) pb.grad_student = make_row_tensor<acc_t>(grad_s);
  if (pb.opt.teacher_grad) pb.grad_teacher = make_row_tensor<acc_t>(grad_t);
  dispatch_divergence(pb);
  if (pb.error == RowError::AllMasked) raise_all_neg_inf(pb.error_row);
  if (pb.error == RowError::LabelOutOfRange) {
    raise_label_out_of_range(pb.error_row, pb.labels[pb.error_row], pb.vocab, pb.opt.ignore_index);
  }
}

// kd_loss_cpp, or with `inplace` kd_loss_cpp_inplace: the student gradient written over the
// student logits (each tile's logits are read, or copied, before its gradient is written).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::optional<at::Tensor>& normalizer, const KdLossOptions& opt,
                                                   bool inplace) {
  const bool student_grad = opt.student_grad, teacher_grad = opt.teacher_grad;
  check_inputs(op, student, teacher, labels, mask, normalizer, opt);
  TORCH_CHECK_VALUE(student.device().is_cpu(), op, ": runs on CPU tensors, got ", student.device());
  const int64_t n = student.size(0), v = student.size(1);
  const auto loss_opts = student.options().dtype(loss_dtype(student));
  at::Tensor row_loss = at::empty({n}, loss_opts);
  const bool own_grad = student_grad && !inplace;
  at::Tensor grad_s = at::empty(own_grad ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, student.options());
  at::Tensor grad_t = at::empty(teacher_grad ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, teacher.options());
  advise_huge_pages(grad_s);
  advise_huge_pages(grad_t);
  at::Tensor labels_c = labels.has_value() ? labels->contiguous() : at::Tensor();
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor divisor =
      loss_divisor(kept_rows(labels, mask, opt.ignore_index), n, normalizer, opt.reduction, loss_opts);
  if (n > 0) {
    const double row_scale = 1.0 / divisor.item<double>();
    auto fill = [&](auto& pb) {
      pb.opt = opt;
      pb.n_rows = n;
      pb.vocab = v;
      pb.labels = labels_c.defined() ? labels_c.data_ptr<int64_t>() : nullptr;
      pb.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
      pb.row_scale = row_scale;
      pb.inplace = inplace;
    };
    if (student.scalar_type() == at::kDouble) {
      Problem<double> pb;
      fill(pb);
      pb.row_loss = row_loss.data_ptr<double>();
      compute(pb, student, teacher, inplace ? student : grad_s, grad_t);
    } else {
      Problem<float> pb;
      fill(pb);
      pb.row_loss = row_loss.data_ptr<float>();
      compute(pb, student, teacher, inplace ? student : grad_s, grad_t);
    }
  }
  at::Tensor loss = opt.reduction == Reduction::None ? row_loss : row_loss.sum().div(divisor);
  return {loss, grad_s, grad_t};
}

KDCORE_DEFINE_KD_LOSS_OP(kd_loss_cpp, run, false)
KDCORE_DEFINE_KD_LOSS_OP(kd_loss_cpp_inplace, run, true)

}  // namespace
}  // namespace cpu
}  // namespace kdcore

TORCH_LIBRARY_IMPL(kdcore, CPU, m) {
  m.impl("kd_loss_cpp", &kdcore::cpu::kd_loss_cpp);
  m.impl("kd_loss_cpp_inplace", &kdcore::cpu::kd_loss_cpp_inplace);
}

KDCORE_PYTHON_MODULE("kdcore's CPU kernels for one instruction set",
                     PyModule_AddStringConstant(module, "capability", KDCORE_STRINGIFY(CPU_CAPABILITY)))
