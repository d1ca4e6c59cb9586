// Command pod-runner is test tooling for the local control plane that
// scripts/cluster runs; it is never part of the product. It stands in for a
// kubelet and a container runtime on the fake nodes that kwok keeps Ready (kwok
// itself never touches pods), so that Deployments, Jobs and Services made by the
// real controllers get real processes behind them.
//
// It watches the pods bound to --nodes and, for each, runs every container as
// a local process and writes the pod's status (phase, IPs, conditions,
// container states) back through the status subresource, as a kubelet would:
//
//   - Images are ignored: the container's command (required: there is no image
//     entrypoint) runs on the host's file system, with --path prepended to PATH
//     so that, say, `imagegen` is the locally built binary. Kubernetes $(VAR)
//     expansion, env/envFrom (values, Secrets, ConfigMaps, fieldRefs) and
//     workingDir are honoured. Processes run as the runner's user;
//     securityContext and resources are ignored. Each container's stdout and
//     stderr go to <state>/pods/<ns>_<name>_<uid>/logs/<container>.log (no
//     `kubectl logs`).
//   - Network: as with a bridge CNI plugin, each pod has its own network
//     namespace (`ip netns`, named imgpod-<8 hex digits of the pod uid>) with
//     loopback and an eth0 that a veth pair joins to the bridge imgpod0 on the
//     host. The bridge holds the gateway address, --pod-gateway (default
//     10.244.0.1/16); pods get the other addresses of that prefix, lowest free
//     first, as status.podIP, and a default route via the gateway. So a server
//     can listen on 0.0.0.0, ports never collide between pods, the runner's
//     probes and the host reach a pod at its address, pods reach each other
//     and the host at the gateway address, and nothing else: there is no NAT
//     and the bridge does not forward. Pods have no DNS and no Services
//     (there is no kube-proxy). The API server listens on the host's loopback
//     only; the runner relays the gateway address's port 6443 to it, and sets
//     KUBERNETES_SERVICE_HOST/PORT to that address, as a kubelet does with the
//     `kubernetes` Service's, so in-cluster clients with the pod's
//     kube-api-access token work. status.hostIP is the gateway address. The pod's namespace goes,
//     with any process still in it, when the pod ends; at exit the runner removes every namespace it made
//     and the bridge, and at start it removes those a killed runner left.
//     Only one runner per machine: a second one refuses to start.
//   - Volumes: each container runs in its own mount namespace (unshare, so the
//     runner must be root) with the pod's volumes bind-mounted at their
//     mountPaths (readOnly ones remounted read-only). emptyDir, secret,
//     configMap, downwardAPI (fieldRef items), projected (including the
//     kube-api-access token, made with the TokenRequest API and bound to the
//     pod), hostPath and persistentVolumeClaim are supported; a claim <ns>/<c>
//     is the host folder <--volumes>/<ns>/<c>, shared by every pod that mounts
//     it whatever its access modes (each mount is logged, with a warning when a
//     ReadWriteOnce claim is in use on two nodes). Files are written once,
//     when the pod starts. A mountPath missing on the host (/store, /models)
//     is created there empty (mounts happen only inside the namespaces) and
//     removed when the last pod using it ends.
//   - Probes: httpGet and tcpSocket startup, readiness and liveness probes,
//     dialled from the host to the pod address; exec and grpc probes always pass.
//   - restartPolicy: exited containers restart with backoff (1s doubling to
//     30s) as Kubernetes says; when all containers have ended for good the pod
//     is Succeeded or Failed, so the Job controller sees the outcome.
//   - Deletion: SIGTERM to the container's process group, SIGKILL after the
//     grace period (at most 30s), then the pod is deleted with grace period 0,
//     which nothing else would do without a kubelet.
//
// One line per pod event goes to stderr. On SIGTERM or SIGINT the runner kills
// every process it started, removes the pod network and exits, leaving the pod
// objects as they are. It needs root, ip (iproute2) and unshare (util-linux).
// `pod-runner --cleanup` only removes what a killed runner left behind (when no
// runner is alive) and exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"maps"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
)

type runner struct {
	ctx              context.Context
	cs               kubernetes.Interface
	nodes            map[string]bool
	path, state, vol string
	gw               netip.Prefix // the bridge's address; its prefix is the pods'
	ipCmd            string
	unshare, bash    string
	lock             *os.File // the network lock, held while the runner lives

	mu     sync.Mutex
	pods   map[types.UID]*podRun
	done   map[types.UID]bool           // deleted by us; later events (finalizers) are ignored
	ips    map[string]bool              // addresses of live pods
	dirs   map[string]int               // host paths created as mount points -> pods using them
	claims map[string]map[string]string // claim -> pod -> node, for the Multi-Attach log
}

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster")
	nodes := flag.String("nodes", "cpu-node,gpu-node,gpu-node-2", "comma-separated node names whose pods this runner runs")
	path := flag.String("path", "", "folder prepended to every container's PATH")
	state := flag.String("state", "", "folder for per-pod volumes and logs (required)")
	volumes := flag.String("volumes", "", "host folder of PersistentVolumeClaims (default <state>/volumes)")
	gateway := flag.String("pod-gateway", "10.244.0.1/16", "address of the host on the pod bridge, with the pod network's prefix length")
	cleanup := flag.Bool("cleanup", false, "only remove the pod network a killed runner left behind, then exit")
	flag.Parse()
	gw, err := netip.ParsePrefix(*gateway)
	if err != nil || !gw.Addr().Is4() || gw.Bits() < 8 || gw.Bits() > 30 ||
		gw.Addr() == gw.Masked().Addr() || !gw.Contains(gw.Addr().Next()) {
		log.Fatalf("--pod-gateway %q: want an IPv4 host address with a prefix length of 8 to 30, like 10.244.0.1/16", *gateway)
	}
	r := &runner{gw: gw, pods: map[types.UID]*podRun{}}
	if r.ipCmd, err = exec.LookPath("ip"); err != nil {
		r.ipCmd = "/usr/sbin/ip" // where iproute2 puts it, often not on a user's PATH
	}
	if *cleanup {
		if r.lock, err = lockNetwork(); err != nil {
			log.Printf("nothing removed: %v", err)
			return
		}
		r.sweepNetwork()
		return
	}
	if *state == "" {
		log.Fatal("--state is required")
	}
	if *volumes == "" {
		*volumes = filepath.Join(*state, "volumes")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatal(err)
	}
	// Many pods start at once in tests; client-go's default 5 QPS would pace them.
	cfg.QPS, cfg.Burst = 100, 200
	r.cs, r.nodes = kubernetes.NewForConfigOrDie(cfg), map[string]bool{}
	r.path, r.state, r.vol = *path, *state, *volumes
	r.done, r.ips = map[types.UID]bool{}, map[string]bool{}
	r.dirs, r.claims = map[string]int{}, map[string]map[string]string{}
	for _, n := range strings.Split(*nodes, ",") {
		r.nodes[strings.TrimSpace(n)] = true
	}
	if r.unshare, err = exec.LookPath("unshare"); err == nil {
		r.bash, err = exec.LookPath("bash")
	}
	if err != nil {
		log.Fatal(err)
	}
	// Signals are caught from here on, so that a TERM never leaves the bridge behind.
	var stop context.CancelFunc
	r.ctx, stop = signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// The lock first: the sweep then only removes what a dead runner left
	// (the bridge included, so it is made afresh with the right address).
	if r.lock, err = lockNetwork(); err != nil {
		log.Fatal(err)
	}
	r.sweepNetwork()
	if err := r.makeBridge(); err != nil {
		r.sweepNetwork()
		log.Fatalf("making bridge %s: %v", bridgeName, err)
	}
	apiURL, err := url.Parse(cfg.Host)
	if err == nil {
		err = r.relayAPI(apiURL.Host)
	}
	if err != nil {
		r.sweepNetwork()
		log.Fatalf("relaying the API server to the pods: %v", err)
	}

	// One informer over all pods: a field selector takes one node name only,
	// and a test cluster has few pods.
	factory := informers.NewSharedInformerFactory(r.cs, 0)
	inf := factory.Core().V1().Pods().Informer()
	_, err = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { r.handle(o.(*corev1.Pod)) },
		UpdateFunc: func(_, o any) { r.handle(o.(*corev1.Pod)) },
		DeleteFunc: r.gone,
	})
	if err != nil {
		log.Fatal(err)
	}
	factory.Start(r.ctx.Done())
	log.Printf("running pods of nodes %s (state %s, claims %s, bridge %s %s)", *nodes, r.state, r.vol, bridgeName, r.gw)
	<-r.ctx.Done()
	r.shutdown()
}

// handle reacts to a pod's latest state: start it, or end it once it is being deleted.
func (r *runner) handle(pod *corev1.Pod) {
	if !r.nodes[pod.Spec.NodeName] {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.pods[pod.UID]
	switch {
	case r.done[pod.UID] || r.ctx.Err() != nil:
	case pod.DeletionTimestamp != nil && p != nil:
		go p.terminate(gracePeriod(pod), true)
	case pod.DeletionTimestamp != nil:
		// Nothing of ours runs (a finished pod, or one from before this runner
		// started): only the final delete is left.
		r.done[pod.UID] = true
		go r.deletePod(pod)
	case p == nil && pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed:
		// A pod that a previous runner had started is started afresh.
		r.pods[pod.UID] = r.newPod(pod.DeepCopy())
	}
}

// gone: the pod object was removed (force delete, or our own delete).
func (r *runner) gone(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	pod, ok := o.(*corev1.Pod)
	if !ok {
		return
	}
	r.mu.Lock()
	p := r.pods[pod.UID]
	delete(r.done, pod.UID)
	r.mu.Unlock()
	if p != nil {
		// Killed now, even if a graceful termination is under way.
		go func() {
			p.cancel()
			p.signal(syscall.SIGKILL)
			p.terminate(0, false)
		}()
	}
}

func gracePeriod(pod *corev1.Pod) time.Duration {
	s := int64(30)
	if g := pod.DeletionGracePeriodSeconds; g != nil {
		s = *g
	} else if g := pod.Spec.TerminationGracePeriodSeconds; g != nil {
		s = *g
	}
	return time.Duration(min(s, 30)) * time.Second
}

func (r *runner) deletePod(pod *corev1.Pod) {
	err := r.cs.CoreV1().Pods(pod.Namespace).Delete(r.ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: new(int64), Preconditions: metav1.NewUIDPreconditions(string(pod.UID)),
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		log.Printf("%s/%s: delete: %v", pod.Namespace, pod.Name, err)
		return
	}
	log.Printf("%s/%s: deleted", pod.Namespace, pod.Name)
}

// holdPath makes sure path exists on the host to bind-mount over, creating
// what is missing (a file when !dir) and counting its users; returns the
// paths the caller must hand to releasePaths. Under r.mu.
func (r *runner) holdPath(path string, dir bool) (held []string) {
	parts := strings.Split(strings.Trim(filepath.Clean(path), "/"), "/")
	for i := range parts {
		p := "/" + filepath.Join(parts[:i+1]...)
		if r.dirs[p] == 0 {
			if _, err := os.Stat(p); err == nil {
				continue // the host's own: never ours to remove
			}
			var err error
			if dir || i < len(parts)-1 {
				err = os.Mkdir(p, 0o755)
			} else {
				err = os.WriteFile(p, nil, 0o644)
			}
			if err != nil {
				log.Printf("mount point %s: %v", p, err)
				return held
			}
		}
		r.dirs[p]++
		held = append(held, p)
	}
	return held
}

// releasePaths removes the created mount points nobody uses any more,
// deepest first. Under r.mu.
func (r *runner) releasePaths(held []string) {
	for _, p := range slices.Backward(held) {
		if r.dirs[p]--; r.dirs[p] == 0 {
			delete(r.dirs, p)
			os.Remove(p) // fails, harmlessly, if something else put files there
		}
	}
}

// attach records that pod mounts a claim and logs it, so tests can check
// Multi-Attach situations. Under r.mu.
func (r *runner) attach(claim string, modes []corev1.PersistentVolumeAccessMode, pod, node string) {
	if r.claims[claim] == nil {
		r.claims[claim] = map[string]string{}
	}
	log.Printf("%s: claim %s %v mounted on node %s", pod, claim, modes, node)
	exclusive := slices.Contains(modes, corev1.ReadWriteOnce) || slices.Contains(modes, corev1.ReadWriteOncePod)
	for other, n := range r.claims[claim] {
		if exclusive && n != node {
			log.Printf("%s: WARNING Multi-Attach: claim %s %v is also mounted on node %s by %s", pod, claim, modes, n, other)
		}
	}
	r.claims[claim][pod] = node
}

// shutdown kills every process the runner started, waits briefly for the
// pods' goroutines to clean up their mount points and namespaces, then
// removes whatever of the pod network is left, the bridge included.
func (r *runner) shutdown() {
	r.mu.Lock()
	pods := slices.Collect(maps.Values(r.pods))
	r.mu.Unlock()
	for _, p := range pods {
		p.signal(syscall.SIGKILL)
	}
	deadline := time.After(5 * time.Second)
	for _, p := range pods {
		select {
		case <-p.finished:
		case <-deadline:
		}
	}
	r.sweepNetwork()
	log.Printf("stopped; the processes of %d pods killed, bridge %s removed", len(pods), bridgeName)
}

// ---------------------------------------------------------------------------
// A pod

type podRun struct {
	r        *runner
	pod      *corev1.Pod // as first seen; what is used of the spec cannot change
	key, dir string
	ip       string // the pod's address, on eth0 of its network namespace
	netns    string // the namespace's name, also the host end of its veth pair
	start    metav1.Time
	ctx      context.Context // cancelled when the pod ends: no more starts or status writes
	cancel   context.CancelFunc
	dirty    chan struct{} // status changed; the writer goroutine writes it
	finished chan struct{} // every container has ended for good
	ending   sync.Once

	mu          sync.Mutex // guards what follows and the ctr fields
	inits, main []*ctr
	initDone    bool
	initFailed  bool
	netUp       bool // the namespace is made: the address is reported from then on
	ready       bool // last Ready condition written, for the log line
}

func (r *runner) newPod(pod *corev1.Pod) *podRun {
	p := &podRun{
		r: r, pod: pod, key: pod.Namespace + "/" + pod.Name, ip: r.allocIP(), netns: r.netnsName(pod.UID), start: metav1.Now(),
		dir:   filepath.Join(r.state, "pods", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
		dirty: make(chan struct{}, 1), finished: make(chan struct{}),
	}
	p.ctx, p.cancel = context.WithCancel(r.ctx)
	for i := range pod.Spec.InitContainers {
		p.inits = append(p.inits, newCtr(&pod.Spec.InitContainers[i], "PodInitializing"))
	}
	for i := range pod.Spec.Containers {
		reason := "ContainerCreating"
		if len(p.inits) > 0 {
			reason = "PodInitializing"
		}
		p.main = append(p.main, newCtr(&pod.Spec.Containers[i], reason))
	}
	log.Printf("%s: starting on %s with address %s (netns %s)", p.key, pod.Spec.NodeName, p.ip, p.netns)
	go p.writer()
	go p.run()
	return p
}

// run makes the pod's network namespace and prepares the volumes, runs the
// init containers one after another, then the containers side by side until
// each has ended for good.
func (p *podRun) run() {
	defer close(p.finished)
	var held []string
	defer func() {
		r := p.r
		// Before the address is freed, so a new pod never meets this one's interfaces.
		r.dropPodNet(p.netns)
		r.mu.Lock()
		r.releasePaths(held)
		delete(r.ips, p.ip)
		for _, users := range r.claims {
			delete(users, p.key)
		}
		r.mu.Unlock()
		os.RemoveAll(filepath.Join(p.dir, "volumes")) // emptyDirs and secrets; logs stay
	}()
	p.sync()
	// Like a kubelet whose network plugin fails: the pod stays Pending, and
	// making its sandbox is retried.
	for {
		err := p.setupPodNet()
		if err == nil {
			break
		}
		p.update(func() {
			for _, c := range append(slices.Clone(p.inits), p.main...) {
				p.waiting(c, "ContainerCreating", "pod network: "+err.Error())
			}
		})
		if !sleep(p.ctx, 3*time.Second) {
			return
		}
	}
	p.update(func() { p.netUp = true })
	var vols map[string]string
	for {
		var claims []claimUse
		var err error
		if vols, claims, err = p.volumes(); err == nil {
			p.r.mu.Lock()
			for _, c := range claims {
				p.r.attach(c.key, c.modes, p.key, p.pod.Spec.NodeName)
			}
			p.r.mu.Unlock()
			p.update(func() {
				for _, c := range append(slices.Clone(p.inits), p.main...) {
					c.waitMsg = ""
				}
			})
			break
		}
		// Like a kubelet whose volume setup fails: the pod stays Pending.
		p.update(func() {
			for _, c := range append(slices.Clone(p.inits), p.main...) {
				p.waiting(c, "ContainerCreating", err.Error())
			}
		})
		if !sleep(p.ctx, 3*time.Second) {
			return
		}
	}
	all := append(slices.Clone(p.pod.Spec.InitContainers), p.pod.Spec.Containers...)
	mounts := map[string][]mount{}
	p.r.mu.Lock()
	for _, c := range all {
		mounts[c.Name] = containerMounts(&c, vols)
		for _, m := range mounts[c.Name] {
			held = append(held, p.r.holdPath(m.dst, m.dir)...)
		}
	}
	p.r.mu.Unlock()

	for _, c := range p.inits {
		if !p.runContainer(c, mounts[c.spec.Name]) {
			if p.ctx.Err() == nil {
				p.update(func() { p.initFailed = true })
			}
			return
		}
	}
	p.update(func() { p.initDone = true })
	var wg sync.WaitGroup
	for _, c := range p.main {
		wg.Go(func() { p.runContainer(c, mounts[c.spec.Name]) })
	}
	wg.Wait()
	if p.ctx.Err() == nil {
		log.Printf("%s: all containers ended: %s", p.key, p.phase())
	}
}

// terminate ends the pod: TERM, KILL after grace, then (deleteObj) the final
// delete that a kubelet would make.
func (p *podRun) terminate(grace time.Duration, deleteObj bool) {
	p.ending.Do(func() {
		p.cancel()
		if p.signal(syscall.SIGTERM) > 0 {
			log.Printf("%s: stopping containers (grace %s)", p.key, grace)
		}
		select {
		case <-p.finished:
		case <-time.After(grace):
			p.signal(syscall.SIGKILL)
			<-p.finished
		}
		r := p.r
		r.mu.Lock()
		delete(r.pods, p.pod.UID)
		if deleteObj {
			r.done[p.pod.UID] = true
		}
		r.mu.Unlock()
		if deleteObj {
			r.deletePod(p.pod)
		} else {
			log.Printf("%s: removed from the API; processes killed", p.key)
		}
	})
}

// signal sends sig to the process group of every running container; returns how many.
func (p *podRun) signal(sig syscall.Signal) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, c := range append(slices.Clone(p.inits), p.main...) {
		if c.pid > 0 {
			syscall.Kill(-c.pid, sig)
			n++
		}
	}
	return n
}

func (p *podRun) sync() {
	select {
	case p.dirty <- struct{}{}:
	default:
	}
}

// update changes the pod's state under p.mu and has the status written.
func (p *podRun) update(f func()) {
	p.mu.Lock()
	f()
	p.mu.Unlock()
	p.sync()
}

// writer writes the status each time it changes; one goroutine, so writes
// never overtake each other, and changes made meanwhile are coalesced.
func (p *podRun) writer() {
	pods := p.r.cs.CoreV1().Pods(p.pod.Namespace)
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-p.dirty:
		}
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := pods.Get(p.ctx, p.pod.Name, metav1.GetOptions{})
			if err != nil || cur.UID != p.pod.UID {
				return err
			}
			p.mu.Lock()
			p.fill(&cur.Status)
			p.mu.Unlock()
			_, err = pods.UpdateStatus(p.ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil && p.ctx.Err() == nil && !apierrors.IsNotFound(err) {
			log.Printf("%s: writing status: %v (retrying)", p.key, err)
			sleep(p.ctx, time.Second)
			p.sync()
		}
	}
}

// fill sets what a kubelet owns in the pod's status. Under p.mu.
func (p *podRun) fill(st *corev1.PodStatus) {
	st.Phase = p.phase()
	host := p.r.gw.Addr().String() // the host as its pods see it
	st.HostIP, st.HostIPs = host, []corev1.HostIP{{IP: host}}
	if p.netUp {
		st.PodIP, st.PodIPs = p.ip, []corev1.PodIP{{IP: p.ip}}
	}
	st.StartTime = &p.start
	st.InitContainerStatuses, st.ContainerStatuses = nil, nil
	ready := st.Phase == corev1.PodRunning
	for _, c := range p.inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.status())
	}
	for _, c := range p.main {
		s := c.status()
		ready = ready && s.Ready
		st.ContainerStatuses = append(st.ContainerStatuses, s)
	}
	setCond(st, corev1.PodReadyToStartContainers, true)
	setCond(st, corev1.PodInitialized, p.initDone)
	setCond(st, corev1.ContainersReady, ready)
	setCond(st, corev1.PodReady, ready)
	if ready != p.ready {
		p.ready = ready
		log.Printf("%s: ready=%t", p.key, ready)
	}
}

// phase follows the kubelet: Pending until every container has started once,
// Running while any runs or will restart, then Succeeded or Failed. Under p.mu.
func (p *podRun) phase() corev1.PodPhase {
	if p.initFailed {
		return corev1.PodFailed
	}
	if !p.initDone {
		return corev1.PodPending
	}
	waiting, running, failed := 0, 0, 0
	for _, c := range p.main {
		switch {
		case c.pid > 0 || (!c.done && c.runs > 0):
			running++
		case c.done:
			if c.term.ExitCode != 0 {
				failed++
			}
		default:
			waiting++
		}
	}
	switch {
	case waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case failed > 0:
		return corev1.PodFailed
	}
	return corev1.PodSucceeded
}

func setCond(st *corev1.PodStatus, t corev1.PodConditionType, ok bool) {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
	}
	for i := range st.Conditions {
		if c := &st.Conditions[i]; c.Type == t {
			if c.Status != s {
				c.Status, c.LastTransitionTime = s, metav1.Now()
			}
			return
		}
	}
	st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()})
}

// sleep waits d or until ctx ends; false if ctx ended.
func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}
