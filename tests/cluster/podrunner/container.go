package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// ctr is one container of a pod; its fields are guarded by the pod's mu.
type ctr struct {
	spec                *corev1.Container
	waitReason, waitMsg string
	pid                 int // > 0 while running; also its process group
	startedAt           metav1.Time
	term, last          *corev1.ContainerStateTerminated // the latest exit and the one before
	runs                int                              // times started
	done                bool                             // ended, not to be restarted
	startupOK, readyOK  bool                             // probe results of the current run
}

func newCtr(s *corev1.Container, reason string) *ctr { return &ctr{spec: s, waitReason: reason} }

func (c *ctr) status() corev1.ContainerStatus {
	s := corev1.ContainerStatus{
		Name: c.spec.Name, Image: c.spec.Image, ImageID: c.spec.Image,
		RestartCount: int32(max(c.runs-1, 0)), Started: new(bool),
	}
	s.LastTerminationState.Terminated = c.term
	switch {
	case c.pid > 0:
		*s.Started = c.spec.StartupProbe == nil || c.startupOK
		s.Ready = *s.Started && (c.spec.ReadinessProbe == nil || c.readyOK)
		s.State.Running = &corev1.ContainerStateRunning{StartedAt: c.startedAt}
		s.ContainerID = fmt.Sprintf("podrunner://%d", c.pid)
	case c.waitReason != "" || c.term == nil:
		s.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waitReason, Message: c.waitMsg}
	default:
		s.State.Terminated, s.LastTerminationState.Terminated = c.term, c.last
		s.ContainerID = c.term.ContainerID
	}
	return s
}

// waiting puts c in a waiting state, logging a new reason or message. Under p.mu.
func (p *podRun) waiting(c *ctr, reason, msg string) {
	if c.waitReason != reason || c.waitMsg != msg {
		log.Printf("%s: container %s waiting: %s: %s", p.key, c.spec.Name, reason, msg)
	}
	c.waitReason, c.waitMsg = reason, msg
}

// runContainer starts c and restarts it as the restart policy says, until it
// has ended for good or the pod ends. Returns whether its last exit was 0.
func (p *podRun) runContainer(c *ctr, mounts []mount) bool {
	s, policy := c.spec, p.pod.Spec.RestartPolicy
	init := slices.Contains(p.inits, c)
	logs := filepath.Join(p.dir, "logs")
	os.MkdirAll(logs, 0o755)
	out, err := os.OpenFile(filepath.Join(logs, s.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.update(func() { p.waiting(c, "RunContainerError", err.Error()) })
		return false
	}
	defer out.Close()
	backoff := time.Second
	for {
		argv, env, reason, err := p.prepare(s)
		var cmd *exec.Cmd
		if err == nil {
			cmd = p.command(s, argv, env, mounts)
			cmd.Stdout, cmd.Stderr = out, out
			// Started under p.mu after checking the context, so that
			// terminate either sees this process or stops this start.
			p.mu.Lock()
			if p.ctx.Err() != nil {
				p.mu.Unlock()
				return false
			}
			if err = cmd.Start(); err == nil {
				c.pid, c.startedAt, c.runs, c.waitReason, c.waitMsg = cmd.Process.Pid, metav1.Now(), c.runs+1, "", ""
				c.startupOK, c.readyOK = false, false
			}
			p.mu.Unlock()
			reason = "RunContainerError"
		}
		if err != nil {
			// Like a kubelet: the container waits, and it is retried.
			p.update(func() { p.waiting(c, reason, err.Error()) })
			if !sleep(p.ctx, 3*time.Second) {
				return false
			}
			continue
		}
		pid, started := cmd.Process.Pid, time.Now()
		log.Printf("%s: container %s started (pid %d, restarts %d)", p.key, s.Name, pid, c.runs-1)
		p.sync()
		probing, stopProbes := context.WithCancel(p.ctx)
		exited := make(chan struct{})
		go p.probes(probing, c, pid, exited)
		cmd.Wait()
		stopProbes()
		close(exited)
		// What the process left behind in its group dies with it, as a
		// container's processes die with its pid 1.
		syscall.Kill(-pid, syscall.SIGKILL)

		code := int32(cmd.ProcessState.ExitCode())
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int32(ws.Signal())
		}
		restart := policy == corev1.RestartPolicyAlways || (policy == corev1.RestartPolicyOnFailure && code != 0)
		if init {
			restart = code != 0 && policy != corev1.RestartPolicyNever
		}
		if time.Since(started) > 10*time.Minute {
			backoff = time.Second // the kubelet forgets old crashes too
		}
		log.Printf("%s: container %s exited with code %d", p.key, s.Name, code)
		p.update(func() {
			c.pid = 0
			c.last, c.term = c.term, &corev1.ContainerStateTerminated{
				ExitCode: code, Reason: map[bool]string{true: "Completed", false: "Error"}[code == 0],
				StartedAt: metav1.NewTime(started), FinishedAt: metav1.Now(), ContainerID: fmt.Sprintf("podrunner://%d", pid),
			}
			c.done = !restart || p.ctx.Err() != nil
			if !c.done {
				p.waiting(c, "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container", backoff))
			}
		})
		if !restart {
			return code == 0
		}
		if !sleep(p.ctx, backoff) {
			return false
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// prepare makes the command line and environment of a container, or says
// why it cannot start (the waiting reason and message a kubelet would give).
func (p *podRun) prepare(s *corev1.Container) (argv, env []string, reason string, err error) {
	vars, order, err := p.env(s)
	if err != nil {
		return nil, nil, "CreateContainerConfigError", err
	}
	if len(s.Command) == 0 {
		return nil, nil, "CreateContainerError", errors.New("no command: images are not run, so there is no entrypoint")
	}
	for _, a := range append(slices.Clone(s.Command), s.Args...) {
		argv = append(argv, expand(a, vars))
	}
	for _, k := range order {
		env = append(env, k+"="+vars[k])
	}
	return argv, env, "", nil
}

// env is the container's environment in definition order: envFrom, then env.
func (p *podRun) env(s *corev1.Container) (map[string]string, []string, error) {
	vars := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := vars[k]; !ok {
			order = append(order, k)
		}
		vars[k] = v
	}
	set("PATH", os.Getenv("PATH"))
	set("HOME", "/root")
	set("HOSTNAME", p.pod.Name)
	// The API server, as a kubelet announces the `kubernetes` Service: here
	// the runner's relay on the gateway address (relayAPI).
	set("KUBERNETES_SERVICE_HOST", p.r.gw.Addr().String())
	set("KUBERNETES_SERVICE_PORT", strconv.Itoa(APIPort))
	set("KUBERNETES_SERVICE_PORT_HTTPS", strconv.Itoa(APIPort))
	for _, from := range s.EnvFrom {
		var data map[string][]byte
		var err error
		if ref := from.SecretRef; ref != nil {
			data, err = p.data(true, ref.Name, ref.Optional)
		} else if ref := from.ConfigMapRef; ref != nil {
			data, err = p.data(false, ref.Name, ref.Optional)
		}
		if err != nil {
			return nil, nil, err
		}
		for _, k := range slices.Sorted(maps.Keys(data)) {
			set(from.Prefix+k, string(data[k]))
		}
	}
	for _, e := range s.Env {
		var v *string
		var err error
		switch f := e.ValueFrom; {
		case f == nil:
			x := expand(e.Value, vars)
			v = &x
		case f.SecretKeyRef != nil:
			v, err = p.lookup(true, f.SecretKeyRef.Name, f.SecretKeyRef.Key, f.SecretKeyRef.Optional)
		case f.ConfigMapKeyRef != nil:
			v, err = p.lookup(false, f.ConfigMapKeyRef.Name, f.ConfigMapKeyRef.Key, f.ConfigMapKeyRef.Optional)
		case f.FieldRef != nil:
			x, ferr := p.field(f.FieldRef.FieldPath)
			v, err = &x, ferr
		default:
			log.Printf("%s: env %s: only value, secretKeyRef, configMapKeyRef and fieldRef are supported; left unset", p.key, e.Name)
		}
		if err != nil {
			return nil, nil, err
		}
		if v != nil {
			set(e.Name, *v)
		}
	}
	if p.r.path != "" {
		vars["PATH"] = p.r.path + ":" + vars["PATH"]
	}
	return vars, order, nil
}

// data is a Secret's or ConfigMap's data; empty when it is missing and optional.
func (p *podRun) data(secret bool, name string, optional *bool) (map[string][]byte, error) {
	data := map[string][]byte{}
	var err error
	if secret {
		var s *corev1.Secret
		if s, err = p.r.cs.CoreV1().Secrets(p.pod.Namespace).Get(p.ctx, name, metav1.GetOptions{}); err == nil {
			maps.Copy(data, s.Data)
		}
	} else {
		var cm *corev1.ConfigMap
		if cm, err = p.r.cs.CoreV1().ConfigMaps(p.pod.Namespace).Get(p.ctx, name, metav1.GetOptions{}); err == nil {
			maps.Copy(data, cm.BinaryData)
			for k, v := range cm.Data {
				data[k] = []byte(v)
			}
		}
	}
	if apierrors.IsNotFound(err) && optional != nil && *optional {
		return data, nil
	}
	return data, err
}

// lookup is one key of a Secret or ConfigMap; nil when missing and optional.
func (p *podRun) lookup(secret bool, name, key string, optional *bool) (*string, error) {
	data, err := p.data(secret, name, optional)
	if err != nil {
		return nil, err
	}
	v, ok := data[key]
	if !ok {
		if optional != nil && *optional {
			return nil, nil
		}
		return nil, fmt.Errorf("couldn't find key %s in %s %s/%s", key, kind(secret), p.pod.Namespace, name)
	}
	s := string(v)
	return &s, nil
}

func kind(secret bool) string { return map[bool]string{true: "Secret", false: "ConfigMap"}[secret] }

// field resolves a fieldRef (env or downwardAPI).
func (p *podRun) field(path string) (string, error) {
	pod, host := p.pod, p.r.gw.Addr().String()
	if v, ok := map[string]string{
		"metadata.name": pod.Name, "metadata.namespace": pod.Namespace, "metadata.uid": string(pod.UID),
		"spec.nodeName": pod.Spec.NodeName, "spec.serviceAccountName": pod.Spec.ServiceAccountName,
		"status.podIP": p.ip, "status.podIPs": p.ip, "status.hostIP": host, "status.hostIPs": host,
	}[path]; ok {
		return v, nil
	}
	for prefix, m := range map[string]map[string]string{"metadata.labels['": pod.Labels, "metadata.annotations['": pod.Annotations} {
		if k, ok := strings.CutPrefix(path, prefix); ok && strings.HasSuffix(k, "']") {
			return m[strings.TrimSuffix(k, "']")], nil
		}
	}
	return "", fmt.Errorf("fieldRef %s is not supported", path)
}

// expand does Kubernetes' $(VAR) expansion: $$ is a literal $, and a
// reference to an undefined variable stays as written.
func expand(s string, vars map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch j := strings.IndexByte(s[i+2:], ')'); {
		case s[i+1] == '$':
			b.WriteByte('$')
			i++
		case s[i+1] == '(' && j >= 0:
			if v, ok := vars[s[i+2:i+2+j]]; ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+j])
			}
			i += 2 + j
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// ---------------------------------------------------------------------------
// Volumes

type claimUse struct {
	key   string
	modes []corev1.PersistentVolumeAccessMode
}

// volumes makes the host side of every volume: volume name -> host path.
// Each attempt starts over, so a retry after a missing Secret is clean.
func (p *podRun) volumes() (map[string]string, []claimUse, error) {
	root := filepath.Join(p.dir, "volumes")
	if err := os.RemoveAll(root); err != nil {
		return nil, nil, err
	}
	paths := map[string]string{}
	var claims []claimUse
	for _, v := range p.pod.Spec.Volumes {
		dir := filepath.Join(root, v.Name)
		paths[v.Name] = dir
		var err error
		switch s := v.VolumeSource; {
		case s.Secret != nil:
			err = p.writeKeys(dir, true, s.Secret.SecretName, s.Secret.Items, s.Secret.DefaultMode, s.Secret.Optional)
		case s.ConfigMap != nil:
			err = p.writeKeys(dir, false, s.ConfigMap.Name, s.ConfigMap.Items, s.ConfigMap.DefaultMode, s.ConfigMap.Optional)
		case s.DownwardAPI != nil:
			err = p.writeFields(dir, s.DownwardAPI.Items, s.DownwardAPI.DefaultMode)
		case s.Projected != nil:
			err = p.writeProjected(dir, s.Projected)
		case s.HostPath != nil:
			paths[v.Name] = s.HostPath.Path
		case s.PersistentVolumeClaim != nil:
			ns, name := p.pod.Namespace, s.PersistentVolumeClaim.ClaimName
			var pvc *corev1.PersistentVolumeClaim
			if pvc, err = p.r.cs.CoreV1().PersistentVolumeClaims(ns).Get(p.ctx, name, metav1.GetOptions{}); err == nil {
				paths[v.Name] = filepath.Join(p.r.vol, ns, name)
				err = os.MkdirAll(paths[v.Name], 0o777)
				claims = append(claims, claimUse{ns + "/" + name, pvc.Spec.AccessModes})
			}
		default:
			if s.EmptyDir == nil {
				log.Printf("%s: volume %s: kind not supported; an empty folder instead", p.key, v.Name)
			}
			err = os.MkdirAll(dir, 0o777)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
	}
	return paths, claims, nil
}

// writeKeys writes a Secret's or ConfigMap's keys (all, or items) as files.
func (p *podRun) writeKeys(dir string, secret bool, name string, items []corev1.KeyToPath, mode *int32, optional *bool) error {
	data, err := p.data(secret, name, optional)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		return err
	}
	if len(items) == 0 {
		for _, k := range slices.Sorted(maps.Keys(data)) {
			items = append(items, corev1.KeyToPath{Key: k, Path: k})
		}
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok && optional != nil && *optional {
			continue
		} else if !ok {
			return fmt.Errorf("couldn't find key %s in %s %s/%s", it.Key, kind(secret), p.pod.Namespace, name)
		}
		if err := writeFile(filepath.Join(dir, it.Path), v, cmp.Or(it.Mode, mode)); err != nil {
			return err
		}
	}
	return nil
}

func (p *podRun) writeFields(dir string, items []corev1.DownwardAPIVolumeFile, mode *int32) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, it := range items {
		if it.FieldRef == nil {
			log.Printf("%s: downwardAPI %s: only fieldRef is supported; skipped", p.key, it.Path)
			continue
		}
		v, err := p.field(it.FieldRef.FieldPath)
		if err == nil {
			err = writeFile(filepath.Join(dir, it.Path), []byte(v), cmp.Or(it.Mode, mode))
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (p *podRun) writeProjected(dir string, pr *corev1.ProjectedVolumeSource) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, src := range pr.Sources {
		var err error
		switch {
		case src.Secret != nil:
			err = p.writeKeys(dir, true, src.Secret.Name, src.Secret.Items, pr.DefaultMode, src.Secret.Optional)
		case src.ConfigMap != nil:
			err = p.writeKeys(dir, false, src.ConfigMap.Name, src.ConfigMap.Items, pr.DefaultMode, src.ConfigMap.Optional)
		case src.DownwardAPI != nil:
			err = p.writeFields(dir, src.DownwardAPI.Items, pr.DefaultMode)
		case src.ServiceAccountToken != nil:
			err = p.writeToken(dir, src.ServiceAccountToken, pr.DefaultMode)
		default:
			log.Printf("%s: projected volume source not supported; skipped", p.key)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// writeToken writes a token of the pod's ServiceAccount bound to the pod, as
// the kubelet does for kube-api-access-*. It is not refreshed.
func (p *podRun) writeToken(dir string, t *corev1.ServiceAccountTokenProjection, mode *int32) error {
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		ExpirationSeconds: t.ExpirationSeconds,
		BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.pod.Name, UID: p.pod.UID},
	}}
	if t.Audience != "" {
		req.Spec.Audiences = []string{t.Audience}
	}
	sa := cmp.Or(p.pod.Spec.ServiceAccountName, "default")
	tr, err := p.r.cs.CoreV1().ServiceAccounts(p.pod.Namespace).CreateToken(p.ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, t.Path), []byte(tr.Status.Token), mode)
}

func writeFile(path string, data []byte, mode *int32) error {
	m := os.FileMode(0o644)
	if mode != nil {
		m = os.FileMode(*mode)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(path, data, m); err != nil {
		return err
	}
	return os.Chmod(path, m) // WriteFile's mode went through the umask
}

type mount struct {
	src, dst string
	dir, ro  bool
}

// containerMounts lists a container's mounts, parents before children.
func containerMounts(c *corev1.Container, vols map[string]string) []mount {
	var ms []mount
	for _, vm := range c.VolumeMounts {
		src := filepath.Join(vols[vm.Name], vm.SubPath)
		if _, err := os.Stat(src); err != nil && vm.SubPath != "" {
			os.MkdirAll(src, 0o777) // a missing subPath is made, as by the kubelet
		}
		fi, err := os.Stat(src)
		ms = append(ms, mount{src, filepath.Clean(vm.MountPath), err != nil || fi.IsDir(), vm.ReadOnly})
	}
	slices.SortStableFunc(ms, func(a, b mount) int { return strings.Count(a.dst, "/") - strings.Count(b.dst, "/") })
	return ms
}

func quote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// command runs argv in the pod's network namespace (`ip netns exec`, which
// also mounts a /sys that shows the pod's interfaces) and in a private mount
// namespace (unshare) whose bash script bind-mounts the volumes, then execs
// argv in place: each of the three execs the next, so the pid is the
// container's, and the process group (Setpgid) holds everything it starts.
func (p *podRun) command(s *corev1.Container, argv, env []string, mounts []mount) *exec.Cmd {
	var b strings.Builder
	b.WriteString("set -e\nmp() { [ -e \"$1\" ] || if [ \"$2\" = d ]; then mkdir -p \"$1\"; else mkdir -p \"${1%/*}\"; : >\"$1\"; fi; }\n")
	// Every source is opened before anything is mounted: a mount (say an
	// emptyDir at /tmp) may hide the path of a later source. Opened here, in
	// the new namespace, since a bind mount takes no source from another one.
	// (One exec per fd: bash keeps only the first of `exec 10<a 11<b`.)
	for i, m := range mounts {
		fmt.Fprintf(&b, "exec %d<%s\n", 10+i, quote(m.src))
	}
	for i, m := range mounts {
		// Missing mount points on the host were made by holdPath; what is
		// made here lies inside an earlier mount, in its volume.
		fmt.Fprintf(&b, "mp %s %s\nmount --bind /proc/self/fd/%d %[1]s\n", quote(m.dst), map[bool]string{true: "d", false: "f"}[m.dir], 10+i)
		if m.ro {
			fmt.Fprintf(&b, "mount -o remount,bind,ro %s\n", quote(m.dst))
		}
		fmt.Fprintf(&b, "exec %d<&-\n", 10+i)
	}
	fmt.Fprintf(&b, "cd %s\nexec \"$@\"\n", quote(cmp.Or(s.WorkingDir, "/")))
	cmd := exec.Command(p.r.ipCmd, append([]string{"netns", "exec", p.netns,
		p.r.unshare, "--mount", "--propagation", "private", p.r.bash, "-c", b.String(), s.Name}, argv...)...)
	cmd.Env = env
	// Pdeathsig: should the runner be killed outright, its containers die too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// ---------------------------------------------------------------------------
// Probes

// probes runs a container's startup probe, then its readiness and liveness
// probes, until ctx ends (the process exited or the pod ends).
func (p *podRun) probes(ctx context.Context, c *ctr, pid int, exited <-chan struct{}) {
	s := c.spec
	kill := func(why string) bool {
		log.Printf("%s: container %s %s; killing it", p.key, s.Name, why)
		syscall.Kill(-pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(gracePeriod(p.pod)):
			syscall.Kill(-pid, syscall.SIGKILL)
		}
		return false
	}
	// set records a result unless this run is over (a late result must not
	// leak into the next run).
	set := func(f func()) {
		p.update(func() {
			if ctx.Err() == nil {
				f()
			}
		})
	}
	if pr := s.StartupProbe; pr != nil {
		started := false
		p.probe(ctx, s, pr, func(ok bool) bool {
			if started = ok; ok {
				set(func() { c.startupOK = true })
				return false
			}
			return kill("failed its startup probe")
		})
		if !started {
			return
		}
	}
	if pr := s.ReadinessProbe; pr != nil {
		go p.probe(ctx, s, pr, func(ok bool) bool { set(func() { c.readyOK = ok }); return true })
	}
	if pr := s.LivenessProbe; pr != nil {
		p.probe(ctx, s, pr, func(ok bool) bool { return ok || kill("failed its liveness probe") })
	}
}

// probe checks pr every periodSeconds after initialDelaySeconds and calls
// change when the result crosses successThreshold or failureThreshold;
// change returns false to stop probing.
func (p *podRun) probe(ctx context.Context, s *corev1.Container, pr *corev1.Probe, change func(ok bool) bool) {
	period := time.Duration(cmp.Or(pr.PeriodSeconds, 10)) * time.Second
	oks, fails, state := 0, 0, 0
	if !sleep(ctx, time.Duration(pr.InitialDelaySeconds)*time.Second) {
		return
	}
	for {
		if p.check(s, pr) == nil {
			oks, fails = oks+1, 0
		} else {
			oks, fails = 0, fails+1
		}
		if ctx.Err() != nil {
			return
		}
		if oks >= int(cmp.Or(pr.SuccessThreshold, 1)) && state != 1 {
			if state = 1; !change(true) {
				return
			}
		} else if fails >= int(cmp.Or(pr.FailureThreshold, 3)) && state != -1 {
			if state = -1; !change(false) {
				return
			}
		}
		if !sleep(ctx, period) {
			return
		}
	}
}

// Probes open a fresh connection each time and accept any certificate, as the kubelet's do.
var probeTransport = &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}

// check runs one httpGet or tcpSocket probe; exec and grpc probes pass.
func (p *podRun) check(s *corev1.Container, pr *corev1.Probe) error {
	timeout := time.Duration(cmp.Or(pr.TimeoutSeconds, 1)) * time.Second
	var port intstr.IntOrString
	host := p.ip
	switch {
	case pr.HTTPGet != nil:
		port, host = pr.HTTPGet.Port, cmp.Or(pr.HTTPGet.Host, host)
	case pr.TCPSocket != nil:
		port, host = pr.TCPSocket.Port, cmp.Or(pr.TCPSocket.Host, host)
	default:
		return nil
	}
	n := port.IntValue()
	for _, cp := range s.Ports {
		if port.Type == intstr.String && cp.Name == port.StrVal {
			n = int(cp.ContainerPort)
		}
	}
	if n == 0 {
		return fmt.Errorf("probe port %s not found", port.String())
	}
	addr := net.JoinHostPort(host, strconv.Itoa(n))
	if pr.TCPSocket != nil {
		conn, err := net.DialTimeout("tcp", addr, timeout)
		if err == nil {
			conn.Close()
		}
		return err
	}
	h := pr.HTTPGet
	path := cmp.Or(h.Path, "/")
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	req, err := http.NewRequest(http.MethodGet, strings.ToLower(cmp.Or(string(h.Scheme), "http"))+"://"+addr+path, nil)
	if err != nil {
		return err
	}
	for _, hd := range h.HTTPHeaders {
		req.Header.Add(hd.Name, hd.Value)
	}
	resp, err := (&http.Client{Timeout: timeout, Transport: probeTransport}).Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return nil
}
