// The CPU attention backward's choice of product kernels (see attention_backward.cpp).
#pragma once

namespace sam2_fast {

// Whether the fp32 and 16-bit attention backward runs its products on brgemm (else on the BLAS torch links): allowed
// (set_brgemm_attention_backward) and brgemm_f32_usable().
bool brgemm_attention_backward();

// Allow (the default) or forbid the brgemm products, e.g. to compare them with the BLAS's.
void set_brgemm_attention_backward(bool enabled);

}  // namespace sam2_fast
