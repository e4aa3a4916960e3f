package main

import (
	"encoding/pem"
	"io"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/socksfwd/socksfwd/internal/peertest"
)

// servegit VAR CAVAR: an HTTPS server on 127.0.0.1 (address in $VAR)
// that serves the repository repo.git over smart HTTP (git's own
// http-backend, by CGI), with one commit whose README says "through
// dante", and answers "hello" at /hello. Its certificate is for
// 127.0.0.1, ::1 and *.example.com; $CAVAR is a PEM file for clients
// to trust it.
func cmdServeGit(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: servegit VAR CAVAR")
	}
	git := peertest.Require(peerTB{ts}, "git")
	out, err := exec.Command(git, "--exec-path").Output()
	ts.Check(err)
	backend := filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	root := filepath.Join(ts.Getenv("WORK"), "gitroot")
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + root, "GIT_CONFIG_NOSYSTEM=1",
		"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.invalid", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.invalid"}
	work := filepath.Join(root, "work")
	ts.Check(os.MkdirAll(work, 0o755))
	ts.Check(os.WriteFile(filepath.Join(work, "README"), []byte("through dante\n"), 0o644))
	for _, argv := range [][]string{
		{"init", "-q", "-b", "main", work},
		{"-C", work, "add", "README"},
		{"-C", work, "commit", "-q", "-m", "first"},
		{"clone", "-q", "--bare", work, filepath.Join(root, "repo.git")},
	} {
		cmd := exec.Command(git, argv...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			ts.Fatalf("git %s: %v\n%s", strings.Join(argv, " "), err, out)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.Handle("/", &cgi.Handler{Path: backend, Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"}})
	srv := httptest.NewTLSServer(mux)
	ts.Defer(srv.Close)
	ca := filepath.Join(ts.Getenv("WORK"), "ca.pem")
	ts.Check(os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644))
	ts.Setenv(args[0], srv.Listener.Addr().String())
	ts.Setenv(args[1], ca)
}
