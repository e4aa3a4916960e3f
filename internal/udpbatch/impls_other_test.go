//go:build !linux

package udpbatch

// impls: NewReader and NewWriter build the portable implementation here.
var impls = []impl{native}
