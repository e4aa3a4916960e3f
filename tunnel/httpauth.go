package tunnel

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// ProxyCredentials are the user name and password that clients of a door
// must send: Proxy-Authorization: Basic to --http (RFC 9110 §11.7.2), RFC
// 1929 to -D.
// Only digests are kept, so a comparison takes the same time whatever the
// lengths of what was sent.
type ProxyCredentials struct {
	user, password [sha256.Size]byte
}

// ParseProxyCredentials reads "user:pass" (the password may hold colons).
func ParseProxyCredentials(s string) (*ProxyCredentials, error) {
	user, password, ok := strings.Cut(s, ":")
	if !ok || user == "" || password == "" {
		return nil, errors.New("want user:password, both not empty")
	}
	return &ProxyCredentials{user: sha256.Sum256([]byte(user)), password: sha256.Sum256([]byte(password))}, nil
}

// maxSOCKSCredential is the longest user name or password RFC 1929 can
// carry: ULEN and PLEN are one byte each.
const maxSOCKSCredential = 255

// ParseSOCKSCredentials is ParseProxyCredentials for the -D door, whose
// clients send them by RFC 1929: a longer user name or password than the
// frame carries could never be sent, and no client could log in.
func ParseSOCKSCredentials(s string) (*ProxyCredentials, error) {
	c, err := ParseProxyCredentials(s)
	if err != nil {
		return nil, err
	}
	// The error never gives the lengths: they say something of a password.
	if user, password, _ := strings.Cut(s, ":"); len(user) > maxSOCKSCredential || len(password) > maxSOCKSCredential {
		return nil, fmt.Errorf("user name and password must be at most %d bytes each (RFC 1929)", maxSOCKSCredential)
	}
	return c, nil
}

// Equal reports whether c and o hold the same credentials (a reload
// compares them); nil is "no authentication".
func (c *ProxyCredentials) Equal(o *ProxyCredentials) bool {
	if c == nil || o == nil {
		return c == o
	}
	return c.user == o.user && c.password == o.password
}

// allows reports whether r carries these credentials in
// Proxy-Authorization. The header has the syntax of Authorization, so the
// standard library's parser reads it: no hand-written one sees bytes from
// the network.
func (c *ProxyCredentials) allows(r *http.Request) bool {
	header := r.Header.Values("Proxy-Authorization")
	if len(header) != 1 {
		return false
	}
	probe := http.Request{Header: http.Header{"Authorization": header}}
	user, password, ok := probe.BasicAuth()
	return ok && c.Match(user, password)
}

// Match reports whether user and password are these credentials (the -D
// door asks it of each RFC 1929 request).
func (c *ProxyCredentials) Match(user, password string) bool {
	u, p := sha256.Sum256([]byte(user)), sha256.Sum256([]byte(password))
	// Both compared every time: which one was wrong takes no other time.
	return subtle.ConstantTimeCompare(u[:], c.user[:])&subtle.ConstantTimeCompare(p[:], c.password[:]) == 1
}
