// lowbit: the sparse part of GWQ's "int+outliers" weights (see lowbit/kernels/outliers.py).
//
// csr_add_(y, x, rowptr, col, val): y[t, i] += Σ_{k = rowptr[i]}^{rowptr[i+1]−1} val[k] · x[t, col[k]]
// for x (T, n) fp32, y (T, m) fp32, rowptr int32 (m + 1,), col int16 or int32 (nnz,),
// val fp16 (nnz,) — the stored CSR tensors as they are, rows shared out over threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

template <typename C>
static void csr_rows(float* y, const float* x, int64_t T, int64_t m, int64_t n, const int32_t* rp, const C* col,
                     const at::Half* val) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * n;
      float* yt = y + t * m;
      for (int64_t i = begin; i < end; ++i) {
        float s = 0.f;
        for (int32_t k = rp[i]; k < rp[i + 1]; ++k) s += static_cast<float>(val[k]) * xt[col[k]];
        yt[i] += s;
      }
    }
  });
}

void csr_add_(torch::Tensor y, torch::Tensor x, torch::Tensor rowptr, torch::Tensor col, torch::Tensor val) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "csr_add_: x (T, n) and y (T, m)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat, "csr_add_: fp32 x and y");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "csr_add_: contiguous x and y");
  TORCH_CHECK(rowptr.scalar_type() == torch::kInt && rowptr.numel() == y.size(1) + 1, "csr_add_: rowptr int32 (m + 1,)");
  TORCH_CHECK(val.scalar_type() == torch::kHalf && val.numel() == col.numel(), "csr_add_: val fp16 (nnz,)");
  const int64_t T = x.size(0), m = y.size(1), n = x.size(1);
  auto rp = rowptr.contiguous();
  auto v = val.contiguous();
  if (col.scalar_type() == torch::kShort) {
    auto c = col.contiguous();
    csr_rows<int16_t>(y.data_ptr<float>(), x.data_ptr<float>(), T, m, n, rp.data_ptr<int32_t>(), c.data_ptr<int16_t>(),
                      v.data_ptr<at::Half>());
  } else {
    TORCH_CHECK(col.scalar_type() == torch::kInt, "csr_add_: col int16 or int32");
    auto c = col.contiguous();
    csr_rows<int32_t>(y.data_ptr<float>(), x.data_ptr<float>(), T, m, n, rp.data_ptr<int32_t>(), c.data_ptr<int32_t>(),
                      v.data_ptr<at::Half>());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("csr_add_", &csr_add_, "y += x S^T for a CSR matrix S (int32 rowptr, int16/int32 col, fp16 val)");
}
