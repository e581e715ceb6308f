// Eight uint8 pixels -> dequantize_u8_value<double>, (u - 127.5) / 127.5 = (2u - 255) / 255, in
// float64 registers: y0 = c r with r = fl(1/255), then one Newton-Markstein correction
// y = y0 + (c - 255 y0) r (the remainder is exact in an FMA). Callers use it only after checking,
// once, that it reproduces the table for all 256 values.
//
// Not a stand-alone header: include it inside an AVX-512 (avx512f) target region, after
// <immintrin.h>, <cstring> and macros.h; it defines static functions in the including namespace.
static AD_FORCEINLINE __m512d u8x8_exact(const uint8_t* p) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m512d c = _mm512_cvtepi32_pd(_mm256_sub_epi32(_mm256_slli_epi32(w, 1), _mm256_set1_epi32(255)));
    const __m512d rcp = _mm512_set1_pd(1.0 / 255.0);
    const __m512d y0 = _mm512_mul_pd(c, rcp);
    return _mm512_fmadd_pd(_mm512_fnmadd_pd(y0, _mm512_set1_pd(255.0), c), rcp, y0);
}

// dst[0, n) = the float64 values of the contiguous uint8 src[0, n): u8x8_exact, the table lut
// for the tail. Only where u8_rows_match_table(lut).
static void convert_u8_row_exact(double* dst, const uint8_t* src, int64_t n, const double* lut) {
    const int64_t n8 = n - n % 8;
    for (int64_t j = 0; j < n8; j += 8) _mm512_storeu_pd(dst + j, u8x8_exact(src + j));
    for (int64_t j = n8; j < n; ++j) dst[j] = lut[src[j]];
}

// Whether convert_u8_row_exact gives the table's value for every byte (callers check once, on a
// CPU with AVX-512: the converted images must be the table's bit for bit).
static bool u8_rows_match_table(const double* lut) {
    alignas(64) uint8_t u[256];
    alignas(64) double y[256];
    for (int i = 0; i < 256; ++i) u[i] = static_cast<uint8_t>(i);
    convert_u8_row_exact(y, u, 256, lut);
    return std::memcmp(y, lut, sizeof(y)) == 0;
}
