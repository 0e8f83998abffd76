// onnxruntime kernel of hadanorm::Attention (attention.h), for float32 and float16 T:
//
//   Attention(q T [..., Nq, D], k T [..., Nk, D], v T [..., Nk, Dv][, mask T broadcastable to [..., Nq, Nk]])
//     -> y T [..., Nq, Dv] = softmax(scale * q k^T + mask) v        attributes: scale (float), precision
//                                                                   ("float" | "bf16" | "int8" | "fast"), layout
//                                                                   ("bhnd" | "bnhd")
//
// q, k and v share their leading dimensions (batch x heads). layout "bnhd": q [B, Nq, H, D], k [B, Nk, H, D],
// v [B, Nk, H, Dv], y [B, Nq, H, Dv] (the heads not yet split off the tokens; the mask still broadcasts to
// [B, H, Nq, Nk]): the same maths without the four head transposes around the op. Each head's k and v are packed once (in parallel over
// heads), then tasks of heads x query-row ranges run on onnxruntime's intra-op pool (or HADANORM_KERNELS_THREADS);
// no task holds more than one key block of scores per row. float16 tensors are converted to float32 first.

#include <cstring>
#include <memory>

#include "attention.h"
#include "int_kernels.h"
#include "ort_util.h"

namespace hadanorm {

namespace {

constexpr const char* kName = "Attention";

template <bool Half>
struct AttentionKernel {
  float scale = 1.0f;
  AttentionPrecision precision = AttentionPrecision::kFloat;
  bool bnhd = false;
  const AttentionPath* path = nullptr;
  HalfKernels half;  // float16 conversions of the same path

  explicit AttentionKernel(const Ort::ConstKernelInfo& info) {
    scale = info.GetAttribute<float>("scale");
    const Isa isa = select_isa();
    precision = parse_attention_precision(info.GetAttribute<std::string>("precision"), isa);
    std::string layout = "bhnd";
    try {
      layout = info.GetAttribute<std::string>("layout");
    } catch (const Ort::Exception&) {  // absent: the default
    }
    if (layout != "bhnd" && layout != "bnhd")
      fail("attribute layout=\"", layout, "\" is not one of bhnd, bnhd; re-export with hn-export");
    bnhd = layout == "bnhd";
    path = &attention_path(precision, isa);
    half = isa_kernels(isa).half;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return status_of(kName, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    log_call(kName, path->name);
    Ort::KernelContext ctx(context);
    Ort::ConstValue qv = ctx.GetInput(0), kv = ctx.GetInput(1), vv = ctx.GetInput(2);
    const std::vector<int64_t> qs = shape_of(qv), ks = shape_of(kv), vs = shape_of(vv);
    const size_t rank = qs.size();
    if (rank < 2 || ks.size() != rank || vs.size() != rank || (bnhd && rank != 4))
      fail("q, k and v must have the same rank ", bnhd ? "4 ([B, N, H, D], layout bnhd)" : ">= 2 ([..., N, D])",
           ", got ", shape_string(qs), ", ", shape_string(ks), ", ", shape_string(vs));
    // the logical [..., N, D] shapes (bnhd: axes 1 and 2 swapped)
    auto logical = [&](std::vector<int64_t> s) {
      if (bnhd) std::swap(s[1], s[2]);
      return s;
    };
    const std::vector<int64_t> lq = logical(qs), lk = logical(ks), lv = logical(vs);
    if (!std::equal(lq.begin(), lq.end() - 2, lk.begin()) || !std::equal(lq.begin(), lq.end() - 2, lv.begin()))
      fail("q, k and v must share their batch and head dimensions, got ", shape_string(qs), ", ", shape_string(ks),
           ", ", shape_string(vs));
    AttentionShape shape;
    shape.nq = lq[rank - 2];
    shape.d = lq[rank - 1];
    shape.nk = lk[rank - 2];
    shape.dv = lv[rank - 1];
    shape.scale = scale;
    shape.precision = attention_precision(precision, *path);
    if (lk[rank - 1] != shape.d || lv[rank - 2] != shape.nk)
      fail("k must have q's D = ", shape.d, " and v k's Nk, got q ", shape_string(qs), ", k ", shape_string(ks),
           ", v ", shape_string(vs));
    const std::vector<int64_t> lead(lq.begin(), lq.end() - 2);
    const int64_t heads = element_count(lead);
    const int64_t per_batch = bnhd ? lead[1] : 1;  // heads interleaved in a row (bnhd)
    shape.q_stride = per_batch * shape.d;
    shape.k_stride = per_batch * shape.d;
    shape.v_stride = per_batch * shape.dv;
    shape.out_stride = per_batch * shape.dv;
    std::vector<int64_t> ys = qs;
    ys[rank - 1] = shape.dv;
    Ort::UnownedValue y = ctx.GetOutput(0, ys);
    if (heads == 0 || shape.nq == 0 || shape.dv == 0) return;
    if (shape.nk == 0) fail("k and v have no keys (Nk = 0): softmax over nothing");

    // mask: right-aligned broadcast to lead + [Nq, Nk]; element strides per target axis (0 where broadcast)
    const size_t inputs = ctx.GetInputCount();
    Ort::ConstValue mv{nullptr};
    std::vector<int64_t> mask_strides(rank, 0);
    if (inputs > 3) mv = ctx.GetInput(3);
    const bool masked = static_cast<const OrtValue*>(mv) != nullptr;
    if (masked) {
      const std::vector<int64_t> ms = shape_of(mv);
      if (ms.size() > rank)
        fail("mask ", shape_string(ms), " has more axes than q ", shape_string(qs));
      std::vector<int64_t> target = lead;  // logical [B, H] (bnhd too)
      target.push_back(shape.nq);
      target.push_back(shape.nk);
      int64_t stride = 1;
      for (size_t a = 0; a < ms.size(); ++a) {
        const size_t mi = ms.size() - 1 - a, ti = rank - 1 - a;
        if (ms[mi] != 1 && ms[mi] != target[ti])
          fail("mask ", shape_string(ms), " does not broadcast to ", shape_string(target), " (q ", shape_string(qs),
               ", k ", shape_string(ks), ")");
        mask_strides[ti] = ms[mi] == 1 ? 0 : stride;
        stride *= ms[mi];
      }
    }

    std::vector<float> q_store, k_store, v_store, m_store;
    const float* q = float_data(qv, Half, q_store, half);
    const float* k = float_data(kv, Half, k_store, half);
    const float* v = float_data(vv, Half, v_store, half);
    const float* mask = masked ? float_data(mv, Half, m_store, half) : nullptr;
    std::vector<float> out_store;
    float* out;
    if constexpr (Half) {
      out_store.resize(static_cast<size_t>(element_count(ys)));
      out = out_store.data();
    } else {
      out = y.GetTensorMutableData<float>();
    }

    const size_t head_bytes = (path->packed_bytes(shape) + 63) / 64 * 64;
    OrtScratch packed_storage(ctx, head_bytes * static_cast<size_t>(heads));  // the session's arena (ort_util.h)
    uint8_t* const packed = packed_storage.data();
    // the first element of head hi (= b * H + h) of a tensor with n rows of width w
    auto head_start = [&](int64_t hi, int64_t n, int64_t w) {
      return bnhd ? (hi / per_batch) * n * per_batch * w + (hi % per_batch) * w : hi * n * w;
    };
    parallel_for(ctx, static_cast<size_t>(heads), [&](size_t hi) {
      const int64_t h = static_cast<int64_t>(hi);
      path->pack(shape, k + head_start(h, shape.nk, shape.d), v + head_start(h, shape.nk, shape.dv),
                 packed + hi * head_bytes);
    });

    const int64_t rpt = path->rows_per_task;
    const int64_t row_tasks = ceil_div(shape.nq, rpt);
    parallel_for(ctx, static_cast<size_t>(heads * row_tasks), [&](size_t task) {
      const int64_t hi = static_cast<int64_t>(task) / row_tasks, rt = static_cast<int64_t>(task) % row_tasks;
      AttentionHead head;
      head.q = q + head_start(hi, shape.nq, shape.d);
      head.out = out + head_start(hi, shape.nq, shape.dv);
      if (mask) {
        int64_t offset = 0, rest = hi;
        for (size_t a = lead.size(); a-- > 0;) {
          offset += (rest % lead[a]) * mask_strides[a];
          rest /= lead[a];
        }
        head.mask = mask + offset;
        head.mask_row = mask_strides[rank - 2];
        head.mask_col = mask_strides[rank - 1];
      }
      path->rows(shape, head, packed + hi * head_bytes, rt * rpt, std::min(shape.nq, (rt + 1) * rpt));
    });
    if constexpr (Half)
      half.to_halves(out, static_cast<uint16_t*>(y.GetTensorMutableRawData()), element_count(ys));
  }
};

template <bool Half>
struct AttentionOp : Ort::CustomOpBase<AttentionOp<Half>, AttentionKernel<Half>, true> {
  using Kernel = AttentionKernel<Half>;

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return status_of(kName, [&] { *kernel = new Kernel(Ort::ConstKernelInfo(info)); });
  }
  const char* GetName() const { return kName; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return float_type(Half); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 3 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return float_type(Half); }

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape q = ctx.GetInputShape(0);  // y: q's shape with v's last axis (either layout)
    const Ort::ShapeInferContext::Shape& v = ctx.GetInputShape(2);
    if (q.size() < 2 || v.size() != q.size()) return Ort::Status(nullptr);
    q.back() = v.back();
    ctx.SetOutputShape(0, q);
    return Ort::Status(nullptr);
  }
};

AttentionOp<false> g_float_op;
AttentionOp<true> g_half_op;

}  // namespace

void add_attention_ops(Ort::CustomOpDomain& domain) {
  domain.Add(&g_float_op);
  domain.Add(&g_half_op);
}

}  // namespace hadanorm
