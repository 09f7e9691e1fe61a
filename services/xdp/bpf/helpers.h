/* The few libbpf definitions the ingest program needs (libbpf-dev is not required to build
 * corepin): section placement, BTF map definitions and the helper calls by their numbers in
 * include/uapi/linux/bpf.h. */
#ifndef COREPIN_BPF_HELPERS_H
#define COREPIN_BPF_HELPERS_H

#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)BPF_FUNC_redirect_map;

#define bpf_htons(x) ((__be16)__builtin_bswap16((__u16)(x)))

#endif
