/* The machine's ceiling for the low-bit kernels' many-row products: vpdpbusd (64 int8 multiply-adds)
 * back to back on independent accumulators, on every thread, nothing loaded.
 *
 *     cc -O2 -fopenmp -mavx512f -mavx512bw -mavx512vnni bench/vnni_peak.c -o /tmp/vnni_peak && /tmp/vnni_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define DPBUSD(acc) __asm__ volatile("vpdpbusd %1, %2, %0" : "+v"(acc) : "v"(w), "v"(x))

int main(void)
{
    const long per_thread = 100000000; /* instructions */
    double best = 0.0;
    int threads = omp_get_max_threads();
    for (int round = 0; round < 5; round++) {
        double start = omp_get_wtime();
#pragma omp parallel
        {
            __m512i w = _mm512_set1_epi8(1), x = _mm512_set1_epi8(2);
            __m512i a0 = w, a1 = w, a2 = w, a3 = w, a4 = w, a5 = w, a6 = w, a7 = w, a8 = w, a9 = w, a10 = w, a11 = w;
            for (long i = 0; i < per_thread / 12; i++) {
                DPBUSD(a0); DPBUSD(a1); DPBUSD(a2); DPBUSD(a3); DPBUSD(a4); DPBUSD(a5);
                DPBUSD(a6); DPBUSD(a7); DPBUSD(a8); DPBUSD(a9); DPBUSD(a10); DPBUSD(a11);
            }
            __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                           _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
            volatile int keep = _mm512_reduce_add_epi32(sum);
            (void)keep;
        }
        double macs = (double)threads * (per_thread / 12) * 12 * 64, rate = macs / (omp_get_wtime() - start);
        best = rate > best ? rate : best;
    }
    printf("vpdpbusd peak, %d threads: %.0f GMAC/s\n", threads, best / 1e9);
    return 0;
}
