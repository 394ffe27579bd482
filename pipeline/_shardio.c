/* Native half of the direct shard reader (pipeline/shard_reader.py): read byte ranges of shard files
 * into a caller's buffer and crc32c them in the same pass, with the GIL released for a whole window.
 *
 * Why native code: on a machine with as many reader threads as cores, the Python reader pays for the
 * checks twice -- the crc32c pass over each multi-MB chunk runs after the chunk has left the cache, and
 * every read and every crc32c call hands the GIL over and back while the other reader threads and the
 * trainer wait for it. Here each range is read in L2-sized pieces and each piece is checksummed right
 * after the kernel copied it (while it is still in L2), and one call reads every range of a window.
 *
 * crc32c (Castagnoli, reflected, the `crc32c` codec of zarr v3) by carry-less multiplication: 128-bit
 * lanes of the message are folded forward with PCLMULQDQ (four zmm accumulators with AVX-512 VPCLMULQDQ;
 * eight ymm with AVX2 VPCLMULQDQ, on CPUs without AVX-512 such as AMD Zen 3; four xmm otherwise) and the
 * last lane is reduced with the SSE4.2 crc32 instruction. With AVX-512, three
 * scalar crc32 streams run beside the vector folding on other execution ports, over their own parts of
 * each block, and the parts' registers are combined by shifting them over the bytes that follow (a
 * multiplication by x^(8n) mod P, also one carry-less product): ~18% more than the vector alone here.
 * The folding constants x^(D-1) mod P are computed at import, not copied from anywhere: for a lane X = Xh x^64 + Xl
 * that must move D bits forward, Xh x^(D+64) + Xl x^D is what it contributes, and a carry-less product of
 * two bit-reflected operands comes out shifted by one (hence D-1). On a CPU without these instructions
 * (or not x86-64) `kernel` is "" and the Python reader is used instead.
 *
 * read_mapped runs the same plans out of maps of the files (the training loader's reads): each vector is
 * stored to the destination and folded as it is loaded (`copy_kernel`: zmm, ymm or xmm, as for crc32c),
 * one pass over bytes that come from memory, under a guard that turns a SIGBUS of the map into an error
 * of the call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SHARDIO_X86 1
#include <immintrin.h>
#endif

#define POLY_NORMAL 0x1EDC6F41u /* crc32c's generator without its x^32 term, bit d <-> x^d */

static const char *kernel_name = "", *copy_name = "";
static uint32_t (*crc_kernel)(uint32_t, const uint8_t *, size_t) = NULL;
static uint32_t (*copy_kernel)(uint32_t, uint8_t *, const uint8_t *, size_t) = NULL; /* copy + crc32c, if any */

/* x^n mod P in the normal representation (bit d <-> x^d): one multiplication by x at a time. */
static uint32_t xpow_mod(unsigned n) {
    uint32_t r = 1;
    while (n--) r = (r << 1) ^ ((r & 0x80000000u) ? POLY_NORMAL : 0);
    return r;
}

static uint32_t reflect32(uint32_t v) {
    uint32_t r = 0;
    for (int i = 0; i < 32; i++, v >>= 1) r = (r << 1) | (v & 1);
    return r;
}

/* The multiplier that moves a reflected 64-bit operand n bits forward: x^(n-1) mod P, reflected into
 * the top half of a qword (a 64-bit reflected operand has bit i <-> x^(63-i)). */
static uint64_t fold_constant(unsigned n) { return (uint64_t)reflect32(xpow_mod(n - 1)) << 32; }

#ifdef SHARDIO_X86
/* Loops over a kernel's accumulators are unrolled, so that the compiler keeps them in registers: indexed
 * by a loop counter, gcc -O2 kept them on the stack (a load and a store per fold). */
#define UNROLL _Pragma("GCC unroll 8")

static uint64_t k128[2], k256[2], k512[2], k2048[2]; /* {for the lane's first qword, for its second}, per distance */

static void set_pair(uint64_t k[2], unsigned bits) {
    k[0] = fold_constant(bits + 64);
    k[1] = fold_constant(bits);
}

__attribute__((target("sse4.2"))) static uint64_t crc_bytes(uint64_t c, const uint8_t *p, size_t n) {
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
    }
    for (; n; p++, n--) c = _mm_crc32_u8((uint32_t)c, *p);
    return c;
}

/* The register after a message whose folded remainder is the 128-bit lane x: (X x^32) mod P. */
__attribute__((target("sse4.2"))) static uint64_t reduce_lane(__m128i x) {
    uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x));
    return _mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(x, 1));
}

__attribute__((target("sse4.2,pclmul"))) static __m128i fold128(__m128i x, __m128i k, __m128i next) {
    __m128i hi = _mm_clmulepi64_si128(x, k, 0x00), lo = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(hi, lo), next);
}

static __m128i pair128(const uint64_t k[2]) { return _mm_set_epi64x((long long)k[1], (long long)k[0]); }

/* Four xmm accumulators folded over the `body` bytes of src (whole 64-byte blocks, at least two), each
 * vector also stored to dst when `copy` (then the caller's constant, so each caller gets its own loop):
 * the register after them. Shared by crc32c and the one-pass copy, so both fold the same way. */
__attribute__((target("sse4.2,pclmul"), always_inline)) static inline uint64_t xmm_pass(uint32_t crc, uint8_t *dst,
                                                                                     const uint8_t *src, size_t body,
                                                                                     int copy) {
    const __m128i k4 = pair128(k512), k1 = pair128(k128);
    __m128i x[4];
    UNROLL for (int i = 0; i < 4; i++) {
        x[i] = _mm_loadu_si128((const __m128i *)(src + 16 * i));
        if (copy) _mm_storeu_si128((__m128i *)(dst + 16 * i), x[i]);
    }
    x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128((int)~crc)); /* the register enters as the first 4 bytes */
    for (size_t at = 64; at < body; at += 64)
        UNROLL for (int i = 0; i < 4; i++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(src + at + 16 * i));
            if (copy) _mm_storeu_si128((__m128i *)(dst + at + 16 * i), v);
            x[i] = fold128(x[i], k4, v);
        }
    return reduce_lane(fold128(fold128(fold128(x[0], k1, x[1]), k1, x[2]), k1, x[3]));
}

__attribute__((target("sse4.2,pclmul"))) static uint32_t crc_pclmul(uint32_t crc, const uint8_t *p, size_t n) {
    size_t body = n < 128 ? 0 : n / 64 * 64;
    uint64_t c = body ? xmm_pass(crc, NULL, p, body, 0) : (uint32_t)~crc;
    return (uint32_t)~crc_bytes(c, p + body, n - body); /* the tail */
}

/* crc_pclmul with each 16-byte vector stored to dst as it is loaded from src (one pass). */
__attribute__((target("sse4.2,pclmul"))) static uint32_t copy_crc_pclmul(uint32_t crc, uint8_t *dst, const uint8_t *src,
                                                                        size_t n) {
    size_t body = n < 128 ? 0 : n / 64 * 64;
    uint64_t c = body ? xmm_pass(crc, dst, src, body, 1) : (uint32_t)~crc;
    memcpy(dst + body, src + body, n - body);
    return (uint32_t)~crc_bytes(c, dst + body, n - body); /* the tail */
}

/* -- AVX2 + VPCLMULQDQ (x86 CPUs with 256-bit carry-less products but no AVX-512, e.g. AMD Zen 3) ---- */
#define AVX2V "avx2,vpclmulqdq,sse4.2,pclmul"

__attribute__((target(AVX2V))) static __m256i fold256(__m256i x, __m256i k, __m256i next) {
    __m256i hi = _mm256_clmulepi64_epi128(x, k, 0x00), lo = _mm256_clmulepi64_epi128(x, k, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(hi, lo), next);
}

/* Eight ymm accumulators folded over the `body` bytes of src (whole 256-byte blocks, at least two), each
 * vector also stored to dst when `copy` (as xmm_pass): the register after them. The accumulators fold 32
 * bytes forward into each other in turn, the last one's two lanes into one, and that lane is reduced. */
__attribute__((target(AVX2V), always_inline)) static inline uint64_t ymm_pass(uint32_t crc, uint8_t *dst,
                                                                           const uint8_t *src, size_t body, int copy) {
    const __m256i k16 = _mm256_broadcastsi128_si256(pair128(k2048));
    __m256i x[8];
    UNROLL for (int i = 0; i < 8; i++) {
        x[i] = _mm256_loadu_si256((const __m256i *)(src + 32 * i));
        if (copy) _mm256_storeu_si256((__m256i *)(dst + 32 * i), x[i]);
    }
    x[0] = _mm256_xor_si256(x[0], _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)~crc))); /* the register enters */
    for (size_t at = 256; at < body; at += 256)
        UNROLL for (int i = 0; i < 8; i++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(src + at + 32 * i));
            if (copy) _mm256_storeu_si256((__m256i *)(dst + at + 32 * i), v);
            x[i] = fold256(x[i], k16, v);
        }
    const __m256i k2 = _mm256_broadcastsi128_si256(pair128(k256));
    __m256i y = x[0];
    UNROLL for (int i = 1; i < 8; i++) y = fold256(y, k2, x[i]);
    return reduce_lane(fold128(_mm256_castsi256_si128(y), pair128(k128), _mm256_extracti128_si256(y, 1)));
}

__attribute__((target(AVX2V))) static uint32_t crc_vpclmul256(uint32_t crc, const uint8_t *p, size_t n) {
    if (n < 512) return crc_pclmul(crc, p, n);
    size_t body = n / 256 * 256;
    return crc_pclmul((uint32_t)~ymm_pass(crc, NULL, p, body, 0), p + body, n - body); /* the tail */
}

/* crc_vpclmul256 with each 32-byte vector stored to dst as it is loaded from src (one pass). */
__attribute__((target(AVX2V))) static uint32_t copy_crc_vpclmul256(uint32_t crc, uint8_t *dst, const uint8_t *src,
                                                                  size_t n) {
    if (n < 512) return copy_crc_pclmul(crc, dst, src, n);
    size_t body = n / 256 * 256;
    return copy_crc_pclmul((uint32_t)~ymm_pass(crc, dst, src, body, 1), dst + body, src + body, n - body);
}

__attribute__((target("avx512f,avx512vl,vpclmulqdq"))) static __m512i fold512(__m512i x, __m512i k, __m512i next) {
    __m512i hi = _mm512_clmulepi64_epi128(x, k, 0x00), lo = _mm512_clmulepi64_epi128(x, k, 0x11);
    return _mm512_ternarylogic_epi64(hi, lo, next, 0x96); /* hi ^ lo ^ next */
}

#define AVX512 "avx512f,avx512vl,vpclmulqdq,sse4.2,pclmul"

/* The folding constants of the AVX-512 kernels, as vectors: 256 bytes forward, 64 bytes, one lane. */
typedef struct {
    __m512i k16, k4;
    __m128i k1;
} ZmmConstants;

__attribute__((target(AVX512))) static ZmmConstants zmm_constants(void) {
    ZmmConstants k = {_mm512_broadcast_i32x4(pair128(k2048)), _mm512_broadcast_i32x4(pair128(k512)), pair128(k128)};
    return k;
}

/* Four zmm accumulators: loaded from p[0..256) with the register `reg` entering as its first 4 bytes,
 * then folded over every further 256 bytes up to `end`. */
__attribute__((target(AVX512))) static inline void fold_blocks(__m512i x[4], const uint8_t *p, const uint8_t *end,
                                                             uint32_t reg, __m512i k16) {
    UNROLL for (int i = 0; i < 4; i++) x[i] = _mm512_loadu_si512(p + 64 * i);
    x[0] = _mm512_xor_si512(x[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)reg)));
    for (p += 256; p < end; p += 256)
        UNROLL for (int i = 0; i < 4; i++) x[i] = fold512(x[i], k16, _mm512_loadu_si512(p + 64 * i));
}

/* The register of four accumulators: they fold into one, its four lanes into one, that lane is reduced. */
__attribute__((target(AVX512))) static inline uint64_t accumulators_register(const __m512i x[4], ZmmConstants k) {
    __m512i y = fold512(fold512(fold512(x[0], k.k4, x[1]), k.k4, x[2]), k.k4, x[3]);
    __m128i lane = _mm512_extracti32x4_epi32(y, 0);
    lane = fold128(lane, k.k1, _mm512_extracti32x4_epi32(y, 1));
    lane = fold128(lane, k.k1, _mm512_extracti32x4_epi32(y, 2));
    lane = fold128(lane, k.k1, _mm512_extracti32x4_epi32(y, 3));
    return reduce_lane(lane);
}

__attribute__((target(AVX512))) static uint32_t crc_vpclmul(uint32_t crc, const uint8_t *p, size_t n) {
    if (n < 512) return crc_pclmul(crc, p, n);
    const ZmmConstants k = zmm_constants();
    const uint8_t *end = p + n / 256 * 256;
    __m512i x[4];
    fold_blocks(x, p, end, ~crc, k.k16);
    return crc_pclmul((uint32_t)~accumulators_register(x, k), end, n % 256); /* the tail, from the register */
}

/* crc32c of src[0..n) copied to dst in the same pass: each 64-byte vector is stored and folded as it is
 * loaded, so the bytes are read once (out of a map, from memory) instead of copied and then read again. */
__attribute__((target(AVX512))) static uint32_t copy_crc_vpclmul(uint32_t crc, uint8_t *dst, const uint8_t *src,
                                                               size_t n) {
    if (n < 512) return copy_crc_pclmul(crc, dst, src, n);
    const ZmmConstants k = zmm_constants();
    size_t body = n / 256 * 256;
    __m512i x[4];
    UNROLL for (int i = 0; i < 4; i++) {
        x[i] = _mm512_loadu_si512(src + 64 * i);
        _mm512_storeu_si512(dst + 64 * i, x[i]);
    }
    x[0] = _mm512_xor_si512(x[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)~crc)));
    for (size_t at = 256; at < body; at += 256)
        UNROLL for (int i = 0; i < 4; i++) {
            __m512i v = _mm512_loadu_si512(src + at + 64 * i);
            _mm512_storeu_si512(dst + at + 64 * i, v);
            x[i] = fold512(x[i], k.k16, v);
        }
    return copy_crc_pclmul((uint32_t)~accumulators_register(x, k), dst + body, src + body, n - body); /* the tail */
}

/* -- the hybrid kernel: vector folding and three scalar crc32 streams side by side ----------------- */
#define H_ITER 64                /* loop iterations per block */
#define H_S 48                   /* bytes per scalar stream per iteration (measured best of 8-64) */
#define H_LV (256 * H_ITER)      /* a block: H_LV bytes folded by the vector unit, then three parts of */
#define H_LS (H_S * H_ITER)      /* H_LS bytes, one per scalar stream */
#define H_L (H_LV + 3 * H_LS)
static uint64_t h_shift3, h_shift2, h_shift1, h_shift_block;

/* The multiplier that advances a 32-bit register over n zero bytes: as a 64-bit operand the register
 * stands for R x^32, and reduce_lane multiplies by x^32, so the lane must move 8n - 64 bits. */
static uint64_t shift_constant(unsigned nbytes) { return fold_constant(8 * nbytes - 64); }

__attribute__((target("sse4.2,pclmul"))) static uint64_t shift_register(uint64_t c, uint64_t k) {
    return reduce_lane(_mm_clmulepi64_si128(_mm_cvtsi64_si128((long long)c), _mm_cvtsi64_si128((long long)k), 0));
}

__attribute__((target("sse4.2"))) static void scalar_step(uint64_t c[3], const uint8_t *s0) {
    for (int j = 0; j < H_S; j += 8) {
        uint64_t v;
        memcpy(&v, s0 + j, 8);
        c[0] = _mm_crc32_u64(c[0], v);
        memcpy(&v, s0 + H_LS + j, 8);
        c[1] = _mm_crc32_u64(c[1], v);
        memcpy(&v, s0 + 2 * H_LS + j, 8);
        c[2] = _mm_crc32_u64(c[2], v);
    }
}

/* The register of one H_L-byte block from a zero register (blocks are independent: they overlap). The
 * vector part is folded 256 bytes at a time with H_S bytes of each scalar stream between, so that both
 * kinds of instruction are in flight together. */
__attribute__((target(AVX512))) static uint64_t block_register(const uint8_t *p, ZmmConstants k) {
    const uint8_t *s0 = p + H_LV;
    __m512i x[4];
    uint64_t c[3] = {0, 0, 0};
    fold_blocks(x, p, p + 256, 0, k.k16);
    scalar_step(c, s0);
    for (int i = 1; i < H_ITER; i++) {
        p += 256;
        s0 += H_S;
        for (int j = 0; j < 4; j++) x[j] = fold512(x[j], k.k16, _mm512_loadu_si512(p + 64 * j));
        scalar_step(c, s0);
    }
    return shift_register(accumulators_register(x, k), h_shift3) ^ shift_register(c[0], h_shift2) ^
           shift_register(c[1], h_shift1) ^ c[2];
}

__attribute__((target(AVX512))) static uint32_t crc_hybrid(uint32_t crc, const uint8_t *p, size_t n) {
    if (n < H_L) return crc_vpclmul(crc, p, n);
    const ZmmConstants k = zmm_constants();
    uint64_t r = (uint32_t)~crc;
    for (; n >= H_L; p += H_L, n -= H_L) r = shift_register(r, h_shift_block) ^ block_register(p, k);
    return crc_vpclmul((uint32_t)~r, p, n); /* the tail, vector only */
}

static int has_vpclmul256(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq"); }

static void choose_kernel(void) {
    set_pair(k128, 128);
    set_pair(k256, 256);
    set_pair(k512, 512);
    set_pair(k2048, 2048);
    h_shift3 = shift_constant(3 * H_LS);
    h_shift2 = shift_constant(2 * H_LS);
    h_shift1 = shift_constant(H_LS);
    h_shift_block = shift_constant(H_L);
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("sse4.2") || !__builtin_cpu_supports("pclmul")) return;
    crc_kernel = crc_pclmul;
    kernel_name = copy_name = "pclmul";
    copy_kernel = copy_crc_pclmul;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("vpclmulqdq")) {
        crc_kernel = crc_hybrid;
        kernel_name = "vpclmul-crc32";
        copy_kernel = copy_crc_vpclmul;
        copy_name = "vpclmul";
    } else if (has_vpclmul256()) {
        crc_kernel = crc_vpclmul256;
        copy_kernel = copy_crc_vpclmul256;
        kernel_name = copy_name = "vpclmul256";
    }
}
#else
static void choose_kernel(void) {}
#endif

/* -- Python functions ------------------------------------------------------------------------------ */

static int no_kernel(void) {
    if (crc_kernel) return 0;
    PyErr_SetString(PyExc_RuntimeError, "no crc32c kernel for this CPU (pipeline._shardio.kernel is empty)");
    return 1;
}

/* The kernel called `name` ("" or NULL: the one chosen for this CPU), if this CPU can run it. */
static uint32_t (*kernel_called(const char *name))(uint32_t, const uint8_t *, size_t) {
    if (!name || !*name || !strcmp(name, kernel_name)) return crc_kernel;
#ifdef SHARDIO_X86
    if (!strcmp(name, "pclmul") && crc_kernel) return crc_pclmul; /* every x86 kernel implies pclmul */
    if (!strcmp(name, "vpclmul") && crc_kernel == crc_hybrid) return crc_vpclmul; /* the hybrid's vector part */
    if (!strcmp(name, "vpclmul256") && crc_kernel && has_vpclmul256()) return crc_vpclmul256;
#endif
    PyErr_Format(PyExc_ValueError, "crc32c kernel '%s' is not available on this CPU (kernel is '%s')", name, kernel_name);
    return NULL;
}

/* The copy-and-crc32c kernel called `name` ("" or NULL: this CPU's `copy_kernel`), if this CPU can run it. */
static uint32_t (*copy_kernel_called(const char *name))(uint32_t, uint8_t *, const uint8_t *, size_t) {
    if (!name || !*name || !strcmp(name, copy_name)) return copy_kernel;
#ifdef SHARDIO_X86
    if (!strcmp(name, "pclmul") && crc_kernel) return copy_crc_pclmul;
    if (!strcmp(name, "vpclmul256") && crc_kernel && has_vpclmul256()) return copy_crc_vpclmul256;
#endif
    PyErr_Format(PyExc_ValueError, "copy kernel '%s' is not available on this CPU (copy_kernel is '%s')", name,
                 copy_name);
    return NULL;
}

PyDoc_STRVAR(crc32c_doc, "crc32c(data, crc=0, kernel='') -> int\n\n"
                         "crc32c of a contiguous buffer, continuing from `crc`, by `kernel` (default: this CPU's).");

static PyObject *py_crc32c(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer b;
    unsigned int crc = 0;
    const char *name = NULL;
    if (no_kernel() || !PyArg_ParseTuple(args, "y*|Is", &b, &crc, &name)) return NULL;
    uint32_t (*kernel)(uint32_t, const uint8_t *, size_t) = kernel_called(name);
    if (!kernel) {
        PyBuffer_Release(&b);
        return NULL;
    }
    uint32_t out;
    Py_BEGIN_ALLOW_THREADS
    out = kernel(crc, (const uint8_t *)b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(out);
}

PyDoc_STRVAR(copy_crc32c_doc, "copy_crc32c(out, data, crc=0, kernel='') -> int\n\n"
                              "Copy `data` into the start of `out` and return its crc32c, continuing from `crc`, in one\n"
                              "pass by the copy kernel `kernel` (default: this CPU's `copy_kernel`); for tests and the bench.");

static PyObject *py_copy_crc32c(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer out, data;
    unsigned int crc = 0;
    const char *name = NULL;
    PyObject *result = NULL;
    if (no_kernel() || !PyArg_ParseTuple(args, "w*y*|Is", &out, &data, &crc, &name)) return NULL;
    uint32_t (*kernel)(uint32_t, uint8_t *, const uint8_t *, size_t) = copy_kernel_called(name);
    if (kernel && out.len < data.len) PyErr_SetString(PyExc_ValueError, "copy_crc32c: out is smaller than data");
    else if (kernel) {
        uint32_t c;
        Py_BEGIN_ALLOW_THREADS
        c = kernel(crc, (uint8_t *)out.buf, (const uint8_t *)data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
        result = PyLong_FromUnsignedLong(c);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    return result;
}

enum { FD, OFFSET, NBYTES, AT, TRAILER, PLAN_COLUMNS }; /* one int64 row of a read plan */

/* pread until n bytes or end of file; -1 with errno on an error. */
static Py_ssize_t pread_full(int fd, uint8_t *dst, size_t n, int64_t offset) {
    size_t done = 0;
    while (done < n) {
        ssize_t got = pread(fd, dst + done, n - done, (off_t)(offset + (int64_t)done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return -1;
        if (got == 0) break;
        done += (size_t)got;
    }
    return (Py_ssize_t)done;
}

/* Read one plan row into out: its bytes in pieces, each checksummed while still in cache, then its
 * 4 trailer bytes (a whole inner chunk's stored crc32c) if asked. 1: complete, 0: short, -1: errno. */
static int read_row(const int64_t *row, uint8_t *out, size_t piece, uint32_t *crc, uint32_t *stored) {
    int fd = (int)row[FD];
    uint8_t *dst = out + row[AT];
    size_t n = (size_t)row[NBYTES];
    uint32_t c = 0;
    for (size_t done = 0; done < n;) {
        size_t k = n - done < piece ? n - done : piece;
        Py_ssize_t got = pread_full(fd, dst + done, k, row[OFFSET] + (int64_t)done);
        if (got < 0) return -1;
        c = crc_kernel(c, dst + done, (size_t)got);
        if ((size_t)got < k) return 0;
        done += k;
    }
    *crc = c;
    *stored = 0;
    if (row[TRAILER]) {
        uint8_t t[4];
        Py_ssize_t got = pread_full(fd, t, 4, row[OFFSET] + (int64_t)n);
        if (got < 0) return -1;
        if (got < 4) return 0;
        *stored = (uint32_t)t[0] | (uint32_t)t[1] << 8 | (uint32_t)t[2] << 16 | (uint32_t)t[3] << 24;
    }
    return 1;
}

/* A plan's rows in range of out (and, for a mapped plan, its file column an index into `files` maps). */
static int check_plan(const int64_t *p, Py_ssize_t rows, Py_ssize_t out_len, Py_ssize_t files) {
    for (Py_ssize_t i = 0; i < rows; i++) {
        const int64_t *r = p + i * PLAN_COLUMNS;
        if (r[NBYTES] < 0 || r[AT] < 0 || r[OFFSET] < 0 || r[AT] > out_len - r[NBYTES]) {
            PyErr_Format(PyExc_ValueError, "read plan: row %zd (%lld bytes at %lld) is outside the %zd-byte buffer", i,
                         (long long)r[NBYTES], (long long)r[AT], out_len);
            return -1;
        }
        if (files >= 0 && (r[FD] < 0 || r[FD] >= files)) {
            PyErr_Format(PyExc_ValueError, "read plan: row %zd names map %lld of %zd", i, (long long)r[FD], files);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(read_plan_doc,
             "read_plan(out, plan, crcs, stored, piece) -> int\n\n"
             "Read every row of `plan` (int64 [n, 5]: fd, file offset, bytes, offset in out, trailer) into the\n"
             "writable buffer `out`, with the GIL released: crcs[i] the crc32c of row i's bytes, stored[i] the\n"
             "little-endian uint32 after them when row i has trailer 1 (else 0). Returns the number of rows read\n"
             "whole: n, or the first row a file ended inside. OSError on a failed read.");

static PyObject *py_read_plan(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer out, plan, crcs, stored;
    Py_ssize_t piece;
    if (no_kernel() || !PyArg_ParseTuple(args, "w*y*w*w*n", &out, &plan, &crcs, &stored, &piece)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t rows = plan.len / (Py_ssize_t)(PLAN_COLUMNS * sizeof(int64_t));
    const int64_t *p = (const int64_t *)plan.buf;
    if (plan.len != rows * (Py_ssize_t)(PLAN_COLUMNS * sizeof(int64_t)) || crcs.len < rows * 4 ||
        stored.len < rows * 4 || piece < 1) {
        PyErr_SetString(PyExc_ValueError, "read_plan: plan must be int64 [n, 5], crcs and stored uint32 [n], piece >= 1");
        goto done;
    }
    if (check_plan(p, rows, out.len, -1) < 0) goto done;
    Py_ssize_t complete = 0;
    int status = 1, err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; complete < rows; complete++) {
        status = read_row(p + complete * PLAN_COLUMNS, (uint8_t *)out.buf, (size_t)piece,
                          (uint32_t *)crcs.buf + complete, (uint32_t *)stored.buf + complete);
        if (status != 1) break;
    }
    err = errno;
    Py_END_ALLOW_THREADS
    if (status < 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = PyLong_FromSsize_t(complete);
    }
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&plan);
    PyBuffer_Release(&crcs);
    PyBuffer_Release(&stored);
    return result;
}

/* -- reads out of maps of the shard files, under a SIGBUS guard ------------------------------------
 *
 * A map of a file that is cut short after it was mapped, or whose page cannot be read from the disk,
 * answers an access with SIGBUS, whose default action ends the process. The copies out of maps run with
 * this thread's `bus_guard` set: the handler jumps back to the read, which reports the row it was in
 * (the Python side then reads that window again with read calls, which name the damage). A SIGBUS in any
 * other code goes to whatever handler was installed before ours (Python's faulthandler, or the default). */

static __thread sigjmp_buf *bus_guard = NULL;
static struct sigaction bus_previous;
static volatile sig_atomic_t bus_chaining = 0;
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *guard = bus_guard;
    if (guard) {
        bus_guard = NULL;
        siglongjmp(*guard, 1);
    }
    if (!bus_chaining) { /* not a guarded copy: the handler that was there before ours */
        bus_chaining = 1;
        if ((bus_previous.sa_flags & SA_SIGINFO) && bus_previous.sa_sigaction) {
            bus_previous.sa_sigaction(sig, info, context);
            bus_chaining = 0;
            return;
        }
        if (!(bus_previous.sa_flags & SA_SIGINFO) && bus_previous.sa_handler != SIG_DFL &&
            bus_previous.sa_handler != SIG_IGN) {
            bus_previous.sa_handler(sig);
            bus_chaining = 0;
            return;
        }
    }
    /* the default action: the faulting access runs again on return and ends the process with SIGBUS */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
}

/* Ours, unless it is already the SIGBUS handler (checked at every call: a handler installed after ours,
 * faulthandler's say, becomes the one ours passes other SIGBUS on to). 0, or -1 with errno. */
static int guard_sigbus(void) {
    struct sigaction current, ours;
    int status = 0;
    pthread_mutex_lock(&bus_lock);
    if (sigaction(SIGBUS, NULL, &current) == 0 && !((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus)) {
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = on_sigbus;
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&ours.sa_mask);
        bus_previous = current;
        status = sigaction(SIGBUS, &ours, NULL);
    }
    pthread_mutex_unlock(&bus_lock);
    return status;
}

/* Copy one plan row out of the map `src` of `len` bytes into out, in pieces, each checksummed right after
 * its copy (in L2); its trailer's 4 bytes into stored if asked. 1: complete, 0: the map ends inside it. */
static int copy_row(const int64_t *row, const uint8_t *src, size_t len, uint8_t *out, size_t piece, int fused,
                    uint32_t *crc, uint32_t *stored) {
    size_t offset = (size_t)row[OFFSET], n = (size_t)row[NBYTES], need = n + (row[TRAILER] ? 4 : 0);
    if (offset > len || need > len - offset) return 0;
    const uint8_t *s = src + offset;
    uint8_t *d = out + row[AT];
    uint32_t c = 0;
    for (size_t done = 0; done < n;) {
        size_t k = n - done < piece ? n - done : piece;
        if (fused) {
            c = copy_kernel(c, d + done, s + done, k);
        } else {
            memcpy(d + done, s + done, k);
            c = crc_kernel(c, d + done, k);
        }
        done += k;
    }
    *crc = c;
    *stored = row[TRAILER] ? (uint32_t)s[n] | (uint32_t)s[n + 1] << 8 | (uint32_t)s[n + 2] << 16 | (uint32_t)s[n + 3] << 24
                           : 0;
    return 1;
}

/* Every row of a validated plan out of the maps, with the GIL released: the rows read whole, or -1 - the
 * row a SIGBUS hit. */
static Py_ssize_t copy_plan(const int64_t *p, Py_ssize_t rows, const Py_buffer *maps, uint8_t *out, size_t piece,
                            int fused, uint32_t *crcs, uint32_t *stored) {
    volatile Py_ssize_t complete = 0;
    sigjmp_buf jump;
    if (sigsetjmp(jump, 1)) return -1 - complete; /* from on_sigbus, the guard already cleared */
    bus_guard = &jump;
    for (; complete < rows; complete++) {
        const int64_t *r = p + complete * PLAN_COLUMNS;
        const Py_buffer *m = maps + r[FD];
        if (!copy_row(r, (const uint8_t *)m->buf, (size_t)m->len, out, piece, fused, crcs + complete, stored + complete))
            break;
    }
    bus_guard = NULL;
    return complete;
}

PyDoc_STRVAR(read_mapped_doc,
             "read_mapped(out, maps, plan, crcs, stored, piece, fused=True) -> int\n\n"
             "read_plan's contract, out of read-only buffers instead of files (maps of the shard files; a\n"
             "plan row's first column is an index into the sequence `maps`): each row's bytes into out with\n"
             "their crc32c, with the GIL released: checksummed as they are copied, in one pass, where this CPU\n"
             "has the kernel for it (`copy_kernel`) and `fused`, else each piece right after its memcpy. Returns the\n"
             "rows read whole: n, or the first row its map ends inside. OSError (EIO) naming the row when a\n"
             "map answered with SIGBUS (a disk error, or the file was cut short after it was mapped).");

static PyObject *py_read_mapped(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer out, plan, crcs, stored;
    PyObject *sources, *seq = NULL, *result = NULL;
    Py_buffer *maps = NULL;
    Py_ssize_t piece, files = 0, held = 0;
    int fused = 1;
    if (no_kernel() ||
        !PyArg_ParseTuple(args, "w*Oy*w*w*n|p", &out, &sources, &plan, &crcs, &stored, &piece, &fused))
        return NULL;
    fused = fused && copy_kernel;
    Py_ssize_t rows = plan.len / (Py_ssize_t)(PLAN_COLUMNS * sizeof(int64_t));
    const int64_t *p = (const int64_t *)plan.buf;
    if (plan.len != rows * (Py_ssize_t)(PLAN_COLUMNS * sizeof(int64_t)) || crcs.len < rows * 4 ||
        stored.len < rows * 4 || piece < 1) {
        PyErr_SetString(PyExc_ValueError, "read_mapped: plan must be int64 [n, 5], crcs and stored uint32 [n], piece >= 1");
        goto done;
    }
    if (!(seq = PySequence_Fast(sources, "read_mapped: maps must be a sequence of buffers"))) goto done;
    files = PySequence_Fast_GET_SIZE(seq);
    if (check_plan(p, rows, out.len, files) < 0) goto done;
    if (!(maps = PyMem_Calloc(files ? (size_t)files : 1, sizeof(Py_buffer)))) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < files; held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), maps + held, PyBUF_SIMPLE) < 0) goto done;
    if (guard_sigbus() < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    Py_ssize_t complete;
    Py_BEGIN_ALLOW_THREADS
    complete = copy_plan(p, rows, maps, (uint8_t *)out.buf, (size_t)piece, fused, (uint32_t *)crcs.buf,
                         (uint32_t *)stored.buf);
    Py_END_ALLOW_THREADS
    if (complete < 0)
        PyErr_Format(PyExc_OSError, "bus error (SIGBUS) reading plan row %zd out of its map: a disk error, or the file "
                     "was cut short after it was mapped", -1 - complete);
    else
        result = PyLong_FromSsize_t(complete);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(maps + i);
    PyMem_Free(maps);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    PyBuffer_Release(&plan);
    PyBuffer_Release(&crcs);
    PyBuffer_Release(&stored);
    return result;
}

static PyMethodDef methods[] = {
    {"crc32c", py_crc32c, METH_VARARGS, crc32c_doc},
    {"copy_crc32c", py_copy_crc32c, METH_VARARGS, copy_crc32c_doc},
    {"read_plan", py_read_plan, METH_VARARGS, read_plan_doc},
    {"read_mapped", py_read_mapped, METH_VARARGS, read_mapped_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_shardio", "Shard reads checked in the same pass (see pipeline/_shardio.c).", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__shardio(void) {
    choose_kernel();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddStringConstant(m, "kernel", kernel_name) < 0 ||
              PyModule_AddStringConstant(m, "copy_kernel", copy_name) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
