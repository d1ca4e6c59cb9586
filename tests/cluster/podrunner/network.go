package main

// Pod networking: what a bridge CNI plugin does for a kubelet, with the ip
// command. The host gets a bridge holding the gateway address; each pod gets
// a network namespace joined to the bridge by a veth pair. There is no NAT
// and nothing is forwarded, so pods reach the host's bridge address and each
// other, and nothing else.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

const (
	bridgeName = "imgpod0"
	// Each pod's network namespace, and the host end of its veth pair, is
	// named netPrefix + 8 hex digits of its uid: 15 characters, the most an
	// interface name may have. The prefix is how the leftovers of a runner
	// that was killed are recognised.
	netPrefix = "imgpod-"
	// Held (flock) by the runner that owns the bridge, so that a second runner
	// on the machine refuses to start instead of tearing down the first one's
	// network, and leftovers are only swept when no runner is alive.
	lockPath = "/run/imagegen-pod-runner.lock"
	// Where `ip netns add` keeps its namespaces.
	netnsDir = "/run/netns"
)

// lockNetwork takes the machine-wide lock of the pod network; the file must
// stay open (referenced) for as long as the lock is needed.
func lockNetwork() (*os.File, error) {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("another pod runner holds %s and uses bridge %s", lockPath, bridgeName)
		}
		return nil, err
	}
	return f, nil
}

// ip runs the ip command; the error carries its output.
func (r *runner) ip(args ...string) error {
	out, err := exec.Command(r.ipCmd, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sweepNetwork removes every network namespace, interface and the bridge that
// a runner makes, killing what still runs in those namespaces. Only called
// with the lock held: then they are a dead runner's, or this one's at exit.
func (r *runner) sweepNetwork() {
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), netPrefix) {
				r.dropPodNet(e.Name())
			}
		}
	}
	links, _ := os.ReadDir("/sys/class/net")
	for _, l := range links {
		if name := l.Name(); strings.HasPrefix(name, netPrefix) || name == bridgeName {
			r.delLink(name)
		}
	}
}

// makeBridge creates the bridge with the gateway address (after a sweep, so
// it is new and has exactly that address) and brings it up.
func (r *runner) makeBridge() error {
	if err := r.ip("link", "add", bridgeName, "type", "bridge"); err != nil {
		return err
	}
	// Nothing that arrives from the pods is routed on, whatever the host's
	// net.ipv4.ip_forward says (the per-interface setting of the receiving
	// interface decides; a later write to ip_forward resets it, though).
	// Pod-to-pod traffic is bridged, not routed, so it needs no forwarding.
	fwd := filepath.Join("/proc/sys/net/ipv4/conf", bridgeName, "forwarding")
	if err := os.WriteFile(fwd, []byte("0"), 0o644); err != nil {
		return err
	}
	if err := r.ip("addr", "add", r.gw.String(), "dev", bridgeName); err != nil {
		return err
	}
	return r.ip("link", "set", bridgeName, "up")
}

// netnsName names the pod's namespace after its uid (a UUID, 32 hex digits):
// the first 8 digits, or the next 8 should a live pod have those. Under r.mu.
func (r *runner) netnsName(uid types.UID) string {
	hex := strings.ReplaceAll(string(uid), "-", "")
	taken := func(name string) bool {
		return slices.ContainsFunc(slices.Collect(maps.Values(r.pods)), func(p *podRun) bool { return p.netns == name })
	}
	name := netPrefix + hex[:8]
	for i := 8; taken(name) && i+8 <= len(hex); i += 8 {
		name = netPrefix + hex[i:i+8]
	}
	return name
}

// allocIP returns the lowest free pod address in the gateway's prefix,
// skipping the network address, the gateway and the broadcast address. Under r.mu.
func (r *runner) allocIP() string {
	b := r.gw.Masked().Addr().As4()
	network, size := binary.BigEndian.Uint32(b[:]), uint32(1)<<(32-r.gw.Bits())
	for n := network + 1; n < network+size-1; n++ {
		binary.BigEndian.PutUint32(b[:], n)
		if a := netip.AddrFrom4(b); a != r.gw.Addr() && !r.ips[a.String()] {
			r.ips[a.String()] = true
			return a.String()
		}
	}
	log.Fatal("no pod address left")
	return ""
}

// setupPodNet gives the pod its namespace: a veth pair whose host end joins
// the bridge and whose other end is the pod's eth0 with its address, the
// loopback interface up, and the default route via the gateway (which, not
// forwarding, answers for itself only). Whatever an earlier failed attempt
// left is removed first.
func (p *podRun) setupPodNet() error {
	r, ns := p.r, p.netns
	r.dropPodNet(ns)
	addr := fmt.Sprintf("%s/%d", p.ip, r.gw.Bits())
	steps := [][]string{
		{"netns", "add", ns},
		{"link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"link", "set", ns, "master", bridgeName, "up"},
		{"-n", ns, "addr", "add", addr, "dev", "eth0"},
		{"-n", ns, "link", "set", "eth0", "up"},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "route", "add", "default", "via", r.gw.Addr().String()},
	}
	for _, s := range steps {
		if err := r.ip(s...); err != nil {
			return err
		}
	}
	return nil
}

// dropPodNet removes a pod's namespace and veth pair. Processes still in the
// namespace (say a daemon that left its container's process group) are
// killed first, as a container runtime ends every process of a pod. The veth
// pair goes next, at once and both ends (the kernel removes a deleted
// namespace's interfaces later, in the background), then the namespace.
func (r *runner) dropPodNet(ns string) {
	path := filepath.Join(netnsDir, ns)
	if _, err := os.Stat(path); err == nil {
		if out, err := exec.Command(r.ipCmd, "netns", "pids", ns).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
	}
	r.delLink(ns)
	if _, err := os.Stat(path); err == nil {
		if err := r.ip("netns", "del", ns); err != nil {
			log.Printf("network cleanup: %v", err)
		}
	}
}

// delLink deletes a host interface if it exists; one that vanished meanwhile
// (a pod end whose namespace the kernel was removing) is no error.
func (r *runner) delLink(name string) {
	exists := func() bool { _, err := os.Stat(filepath.Join("/sys/class/net", name)); return err == nil }
	if exists() {
		if err := r.ip("link", "del", name); err != nil && exists() {
			log.Printf("network cleanup: %v", err)
		}
	}
}

// APIPort is the port of the API server as pods see it: the gateway address
// stands in for the `kubernetes` Service (there is no kube-proxy), and the
// runner relays each connection to the API server on the host's loopback.
const APIPort = 6443

// relayAPI accepts pods' connections on the gateway address and joins each to
// the API server at apiAddr (host:port) until ctx ends. The bytes pass as they
// are: TLS is between the pod and the API server, whose certificate names the
// gateway address.
func (r *runner) relayAPI(apiAddr string) error {
	ln, err := net.Listen("tcp", netip.AddrPortFrom(r.gw.Addr(), APIPort).String())
	if err != nil {
		return err
	}
	go func() {
		<-r.ctx.Done()
		ln.Close()
	}()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return // closed at shutdown
			}
			go relay(conn, apiAddr)
		}
	}()
	return nil
}

func relay(conn net.Conn, apiAddr string) {
	defer conn.Close()
	api, err := net.DialTimeout("tcp", apiAddr, 5*time.Second)
	if err != nil {
		log.Printf("API relay: %v", err)
		return
	}
	defer api.Close()
	done := make(chan struct{}, 2)
	pipe := func(to, from net.Conn) {
		io.Copy(to, from)
		if tc, ok := to.(*net.TCPConn); ok {
			tc.CloseWrite() // pass the half-close on: the other way may still talk
		}
		done <- struct{}{}
	}
	go pipe(api, conn)
	go pipe(conn, api)
	<-done
	<-done
}
