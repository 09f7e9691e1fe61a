/* corepin's XDP ingest program.
 *
 * UDP to the configured port is redirected into the AF_XDP socket bound to the packet's RX
 * queue (the `xsks` map); everything else goes on to the kernel: ARP, other protocols and
 * ports, fragments, anything it cannot parse, and packets for a queue with no socket. It never
 * drops. Per queue and per CPU, `counters` counts what it did and why (`enum verdict`; the
 * loader reads them as metrics). Ethernet with up to two VLAN tags (802.1Q, 802.1ad), IPv4 with
 * options, IPv6 whose next header is UDP. Every header is bounds-checked before it is read. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "helpers.h"

/* Keep in step with `Verdict` in src/program.rs. */
enum verdict {
	REDIRECTED = 0,  /* into the queue's AF_XDP socket */
	PASS_NOT_IP,     /* ARP, LLDP, ... */
	PASS_NOT_UDP,    /* TCP, ICMP, ... */
	PASS_OTHER_PORT, /* UDP to another port */
	PASS_FRAGMENT,   /* an IP fragment: only the kernel can reassemble it */
	PASS_MALFORMED,  /* truncated headers, an IPv4 header length below 5 */
	PASS_NO_SOCKET,  /* our port, but no socket on this queue */
	PASS_TOO_BIG,    /* our port, but longer than an AF_XDP frame holds */
	VERDICTS,
};

#define MAX_QUEUES 64

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_QUEUES * VERDICTS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* The UDP port to take, host byte order; set by the loader before the program is loaded. */
volatile const __u16 port = 0;

/* The longest frame an AF_XDP socket's UMEM frame holds (0: no limit); set by the loader. A
 * longer one would be dropped by the socket, so it goes to the kernel instead. */
volatile const __u32 max_frame = 0;

struct vlan {
	__be16 tci;
	__be16 proto;
};

static __always_inline int count(__u32 queue, enum verdict v)
{
	__u32 key = (queue < MAX_QUEUES ? queue : MAX_QUEUES - 1) * VERDICTS + v;
	__u64 *n = bpf_map_lookup_elem(&counters, &key);
	if (n)
		*n += 1;
	return v == REDIRECTED ? XDP_REDIRECT : XDP_PASS;
}

SEC("xdp")
int corepin_ingest(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 queue = ctx->rx_queue_index;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return count(queue, PASS_MALFORMED);
	__be16 proto = eth->h_proto;
	void *cur = eth + 1;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan *v = cur;
		if ((void *)(v + 1) > end)
			return count(queue, PASS_MALFORMED);
		proto = v->proto;
		cur = v + 1;
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end)
			return count(queue, PASS_MALFORMED);
		if (ip->ihl < 5)
			return count(queue, PASS_MALFORMED);
		if (ip->frag_off & bpf_htons(0x3fff)) /* MF, or a fragment offset */
			return count(queue, PASS_FRAGMENT);
		if (ip->protocol != IPPROTO_UDP)
			return count(queue, PASS_NOT_UDP);
		cur = (void *)ip + ip->ihl * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return count(queue, PASS_MALFORMED);
		if (ip6->nexthdr == 44 /* IPPROTO_FRAGMENT */)
			return count(queue, PASS_FRAGMENT);
		if (ip6->nexthdr != IPPROTO_UDP)
			return count(queue, PASS_NOT_UDP);
		cur = ip6 + 1;
	} else {
		return count(queue, PASS_NOT_IP);
	}
	struct udphdr *udp = cur;
	if ((void *)(udp + 1) > end)
		return count(queue, PASS_MALFORMED);
	if (udp->dest != bpf_htons(port))
		return count(queue, PASS_OTHER_PORT);
	if (max_frame && data + max_frame < end)
		return count(queue, PASS_TOO_BIG);
	if (!bpf_map_lookup_elem(&xsks, &queue))
		return count(queue, PASS_NO_SOCKET);
	count(queue, REDIRECTED);
	/* XDP_PASS if the socket went away meanwhile. */
	return bpf_redirect_map(&xsks, queue, XDP_PASS);
}

char _license[] SEC("license") = "Dual MIT/GPL";
