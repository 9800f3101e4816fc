// C++ test of the CPU masked-weight kernels, called through the dispatcher, against a naive
// loop nest written here from DESIGN.md §2 (independently of the kernels' code).
//
// Checks forward outputs, keep counts, the collapse guard (threshold reset in place), both
// gradient modes, the grouped ops, non-contiguous views, empty shapes and input validation.
// Exit status 0 when everything matches, 1 otherwise. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// ---- the ops, through the dispatcher ----------------------------------------------------------

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t);
using GFwdSig = std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, double);
using GBwdSig = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
    at::TensorList, at::TensorList, at::TensorList, int64_t);

c10::TypedOperatorHandle<FwdSig> fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rgkernels::masked_weight_fwd", "")
                       .typed<FwdSig>();
  return op;
}
c10::TypedOperatorHandle<BwdSig> bwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rgkernels::masked_weight_bwd", "")
                       .typed<BwdSig>();
  return op;
}
c10::TypedOperatorHandle<GFwdSig> gfwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rgkernels::masked_weight_grouped_fwd", "")
                       .typed<GFwdSig>();
  return op;
}
c10::TypedOperatorHandle<GBwdSig> gbwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rgkernels::masked_weight_grouped_bwd", "")
                       .typed<GBwdSig>();
  return op;
}

// ---- naive reference ------------------------------------------------------------------------

// H'(x) of DESIGN.md §2, in the compute type T (float for float/half/bfloat16, double for double).
template <typename T>
T surrogate(T x) {
  const T ax = std::fabs(x);
  if (ax <= T(0.4)) return T(2) - T(4) * ax;
  if (ax <= T(1)) return T(0.4);
  return T(0);
}

struct RefFwd {
  at::Tensor out;     // [C, K], weight dtype
  at::Tensor counts;  // [C] int32
  at::Tensor thr;     // threshold after the guard
};

// T: compute type. Works on contiguous float/double copies, returns tensors of the weight dtype.
template <typename T>
RefFwd ref_fwd(const at::Tensor& weight, const at::Tensor& threshold, double guard_ratio) {
  const auto st = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(st).contiguous();
  at::Tensor t = threshold.to(st).contiguous();
  const int64_t C = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({C, K}, w.options());
  at::Tensor counts = at::zeros({C}, at::kInt);
  auto run = [&](bool zero) {
    int64_t total = 0;
    for (int64_t i = 0; i < C; ++i) {
      const T ti = zero ? T(0) : t.data_ptr<T>()[i];
      int32_t c = 0;
      for (int64_t j = 0; j < K; ++j) {
        const T wv = w.data_ptr<T>()[i * K + j];
        const T x = std::fabs(wv) - ti;
        const bool m = x > T(0);
        out.data_ptr<T>()[i * K + j] = wv * (m ? T(1) : T(0));
        c += m ? 1 : 0;
      }
      counts.data_ptr<int32_t>()[i] = c;
      total += c;
    }
    return total;
  };
  const int64_t kept = run(false);
  at::Tensor thr = threshold.clone();
  if (guard_ratio >= 0 && C * K > 0 &&
      static_cast<double>(kept) / static_cast<double>(C * K) <= guard_ratio) {
    thr.zero_();
    run(true);
  }
  return {out.to(weight.scalar_type()), counts, thr};
}

// grad_weight (weight dtype) and grad_threshold as float64 (summed in double), plus the sum of
// |terms| of each row for the tolerance.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ref_bwd(const at::Tensor& grad,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& threshold, int64_t mode) {
  const auto st = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(st).contiguous();
  const at::Tensor g = grad.to(st).contiguous();
  const at::Tensor t = threshold.to(st).contiguous();
  const int64_t C = w.size(0), K = w.size(1);
  at::Tensor gw = at::empty({C, K}, w.options());
  at::Tensor gt = at::empty({C}, at::kDouble);
  at::Tensor mag = at::empty({C}, at::kDouble);
  for (int64_t i = 0; i < C; ++i) {
    double s = 0.0, a = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const T wv = w.data_ptr<T>()[i * K + j];
      const T gv = g.data_ptr<T>()[i * K + j];
      const T x = std::fabs(wv) - t.data_ptr<T>()[i];
      const T h = surrogate(x);
      const T m = x > T(0) ? T(1) : T(0);
      const T term = (gv * wv) * h;
      s += static_cast<double>(term);
      a += std::fabs(static_cast<double>(term));
      gw.data_ptr<T>()[i * K + j] = mode == 0 ? (m * gv) * (T(1) + std::fabs(wv) * h) : m * gv;
    }
    gt.data_ptr<double>()[i] = -s;
    mag.data_ptr<double>()[i] = a;
  }
  return {gw.to(weight.scalar_type()), gt, mag};
}

// ---- comparisons ------------------------------------------------------------------------------

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b);
}

bool close_rows(const at::Tensor& got, const at::Tensor& want, const at::Tensor& mag, double rtol) {
  if (got.sizes() != want.sizes() || got.scalar_type() != at::kFloat) return false;
  const at::Tensor g = got.to(at::kDouble);
  for (int64_t i = 0; i < g.size(0); ++i) {
    const double d = std::fabs(g.data_ptr<double>()[i] - want.data_ptr<double>()[i]);

    // summation error of the compute type, plus the final rounding to float32
    const double want_i = want.data_ptr<double>()[i];
    const double tol = rtol * mag.data_ptr<double>()[i] + 0x1p-24 * std::fabs(want_i) + 1e-30;
    if (!(d <= tol)) return false;
  }
  return true;
}

double grad_rtol(at::ScalarType st) { return st == at::kDouble ? 1e-12 : 1e-5; }

// ---- test cases -----------------------------------------------------------------------------

// A [C, K] weight in the given layout: 0 contiguous, 1 transposed view, 2 every other column.
at::Tensor make_weight(int64_t C, int64_t K, at::ScalarType st, int layout) {
  if (layout == 1) return at::randn({K, C}).to(st).t();
  if (layout == 2) return at::randn({C, 2 * K}).to(st).slice(1, 0, 2 * K, 2);
  return at::randn({C, K}).to(st);
}

template <typename T>
void case_single(int64_t C, int64_t K, at::ScalarType st, int layout, double guard) {
  const std::string tag = "C=" + std::to_string(C) + " K=" + std::to_string(K) + " dtype=" +
                          c10::toString(st) + " layout=" + std::to_string(layout) +
                          " guard=" + std::to_string(guard);
  at::Tensor w = make_weight(C, K, st, layout);
  at::Tensor t = (at::rand({C}) * 1.6 - 0.4).to(at::kFloat);  // includes negative thresholds
  const RefFwd ref = ref_fwd<T>(w, t, guard);
  at::Tensor t_kernel = t.clone();
  auto [out, counts] = fwd_op().call(w, t_kernel, guard);
  check(same(out, ref.out), "fwd out " + tag);
  check(out.is_contiguous(), "fwd out contiguous " + tag);
  check(same(counts, ref.counts), "fwd counts " + tag);
  check(same(t_kernel, ref.thr), "fwd threshold " + tag);

  at::Tensor g = make_weight(C, K, st, (layout + 1) % 3);
  for (int64_t mode = 0; mode < 2; ++mode) {
    auto [gw_ref, gt_ref, mag] = ref_bwd<T>(g, w, t_kernel, mode);
    auto [gw, gt] = bwd_op().call(g, w, t_kernel, mode);
    check(same(gw, gw_ref), "bwd grad_weight mode=" + std::to_string(mode) + " " + tag);
    check(close_rows(gt, gt_ref, mag, grad_rtol(st)),
          "bwd grad_threshold mode=" + std::to_string(mode) + " " + tag);
  }
}

void run_single_cases() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {3, 7}, {64, 27}, {32, 1152}, {5, 3000}, {0, 4}, {4, 0}, {0, 0}};
  for (const auto& [C, K] : shapes) {
    for (int layout = 0; layout < 3; ++layout) {
      for (const double guard : {-1.0, 0.01, 0.6}) {
        case_single<float>(C, K, at::kFloat, layout, guard);
        case_single<double>(C, K, at::kDouble, layout, guard);
        case_single<float>(C, K, at::kHalf, layout, guard);
        case_single<float>(C, K, at::kBFloat16, layout, guard);
      }
    }
  }
}

void run_guard_cases() {
  // Every threshold above every |W|: nothing kept, so the guard resets the thresholds to 0.
  at::Tensor w = at::randn({16, 50});
  at::Tensor t = at::full({16}, 10.0f);
  auto [out, counts] = fwd_op().call(w, t, 0.01);
  check(at::equal(t, at::zeros({16})), "guard resets the threshold in place");
  check(counts.sum().item<int64_t>() == 16 * 50, "guard keeps every non-zero weight");
  check(at::equal(out, w), "guard output equals the weight");
  // Disabled guard: nothing kept, thresholds untouched.
  at::Tensor t2 = at::full({16}, 10.0f);
  auto [out2, counts2] = fwd_op().call(w, t2, -1.0);
  check(at::equal(t2, at::full({16}, 10.0f)), "disabled guard leaves the threshold");
  check(counts2.sum().item<int64_t>() == 0, "disabled guard: nothing kept");
  // Entirely pruned rows with the guard enabled but not triggered.
  at::Tensor t3 = at::zeros({16});
  t3.slice(0, 0, 16, 2).fill_(100.0f);
  auto [out3, counts3] = fwd_op().call(w, t3, 0.01);
  check(counts3.slice(0, 0, 16, 2).sum().item<int64_t>() == 0, "pruned rows keep nothing");
  check(t3[0].item<float>() == 100.0f, "guard not triggered at 50% density");
}

void run_grouped_cases() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{64, 27}, {0, 5}, {32, 576}, {3, 0},
                                                           {1, 1}, {8, 2000}, {10, 10}};
  for (const at::ScalarType st : {at::kFloat, at::kDouble}) {
    std::vector<at::Tensor> ws, ts;
    for (size_t i = 0; i < shapes.size(); ++i) {
      ws.push_back(make_weight(shapes[i].first, shapes[i].second, st, static_cast<int>(i % 3)));
      ts.push_back((at::rand({shapes[i].first}) * 1.6 - 0.4).to(at::kFloat));
    }
    ts.back().fill_(5.0f);  // the last layer collapses
    for (const double guard : {-1.0, 0.01}) {
      std::vector<at::Tensor> tk;
      for (const auto& t : ts) tk.push_back(t.clone());
      auto [flat_out, flat_counts] = gfwd_op().call(ws, tk, guard);
      int64_t off = 0, row_off = 0;
      for (size_t i = 0; i < ws.size(); ++i) {
        const std::string tag = "grouped layer " + std::to_string(i) + " dtype=" +
                                c10::toString(st) + " guard=" + std::to_string(guard);
        const RefFwd ref = st == at::kDouble ? ref_fwd<double>(ws[i], ts[i], guard)
                                             : ref_fwd<float>(ws[i], ts[i], guard);
        const int64_t C = ws[i].size(0), n = ws[i].numel();
        check(same(flat_out.slice(0, off, off + n).view({C, ws[i].size(1)}), ref.out),
              "fwd out " + tag);
        check(same(flat_counts.slice(0, row_off, row_off + C), ref.counts), "fwd counts " + tag);
        check(same(tk[i], ref.thr), "fwd threshold " + tag);
        off += n;
        row_off += C;
      }
      check(flat_out.numel() == off && flat_counts.numel() == row_off, "grouped flat sizes");
      if (guard >= 0) check(at::equal(tk.back(), at::zeros({10})), "grouped guard is per layer");

      std::vector<at::Tensor> gs;
      for (const auto& w : ws) gs.push_back(make_weight(w.size(0), w.size(1), st, 1));
      for (int64_t mode = 0; mode < 2; ++mode) {
        auto [gws, gts] = gbwd_op().call(gs, ws, tk, mode);
        check(gws.size() == ws.size() && gts.size() == ws.size(), "grouped bwd list sizes");
        for (size_t i = 0; i < ws.size(); ++i) {
          const std::string tag = "grouped bwd layer " + std::to_string(i) + " mode=" +
                                  std::to_string(mode) + " dtype=" + c10::toString(st);
          auto [gw_ref, gt_ref, mag] = st == at::kDouble ? ref_bwd<double>(gs[i], ws[i], tk[i], mode)
                                                         : ref_bwd<float>(gs[i], ws[i], tk[i], mode);
          check(same(gws[i], gw_ref), "grad_weight " + tag);
          check(close_rows(gts[i], gt_ref, mag, grad_rtol(st)), "grad_threshold " + tag);
        }
      }
    }
  }
}

template <typename F>
void expect_error(F f, const std::string& fragment, const std::string& what) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    check(msg.find(fragment) != std::string::npos, what + " (message: " + msg + ")");
    return;
  }
  check(false, what + ": no error raised");
}

void run_error_cases() {
  at::Tensor w = at::randn({4, 5});
  expect_error([&] { fwd_op().call(w, at::zeros({3}), 0.01); }, "entries",
               "wrong threshold length");
  expect_error([&] { fwd_op().call(w.to(at::kInt), at::zeros({4}), 0.01); }, "floating point",
               "integer weight");
  expect_error([&] { fwd_op().call(w, at::zeros({4}, at::kDouble), 0.01); }, "float32",
               "float64 threshold");
  expect_error([&] { bwd_op().call(at::randn({4, 6}), w, at::zeros({4}), 0); }, "shape",
               "grad shape");
  expect_error([&] { bwd_op().call(at::randn({4, 5}), w, at::zeros({4}), 2); }, "grad_mode",
               "bad grad_mode");
  expect_error([&] {
    std::vector<at::Tensor> ws = {w, w.to(at::kDouble)};
    std::vector<at::Tensor> ts = {at::zeros({4}), at::zeros({4})};
    gfwd_op().call(ws, ts, 0.01);
  }, "one dtype", "grouped forward with mixed dtypes");
}

}  // namespace

int main() {
  at::manual_seed(0);
  try {
    run_single_cases();
    run_guard_cases();
    run_grouped_cases();
    run_error_cases();
  } catch (const std::exception& e) {
    std::printf("FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
