package dnsforward

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/miekg/dns"
)

// FuzzReadTCPMessage: the length-prefixed framing is the only part of the
// network bytes we parse ourselves (the message is miekg/dns's). Property:
// no panic; a frame either yields a message, is skipped whole (nil, nil),
// or fails; and a frame followed by a good one never eats the good one.
func FuzzReadTCPMessage(f *testing.F) {
	good := new(dns.Msg)
	good.SetQuestion("example.", dns.TypeA)
	wire, _ := good.Pack()
	frame := binary.BigEndian.AppendUint16(nil, uint16(len(wire)))
	frame = append(frame, wire...)
	f.Add(frame)
	f.Add([]byte{0, 0})
	f.Add([]byte{0, 5, 1, 2, 3, 4, 5})
	f.Add([]byte{0xff, 0xff, 1})
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var lenBuf [2]byte
		r := bytes.NewReader(append(append([]byte{}, b...), frame...))
		m, err := readTCPMessage(r, &lenBuf)
		if err != nil {
			return // the fuzzed bytes cut the stream
		}
		_ = m
		// Whatever the first frame was, if it was read whole, the good
		// frame after it must still be intact when the stream lines up.
		if len(b) >= 2 && int(binary.BigEndian.Uint16(b))+2 == len(b) {
			next, err := readTCPMessage(r, &lenBuf)
			if err != nil || next == nil || next.Question[0].Name != "example." {
				t.Fatalf("the frame after % x was not read intact: %v %v", b, next, err)
			}
		}
	})
}
