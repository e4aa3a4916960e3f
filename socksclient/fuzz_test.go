package socksclient

import (
	"bytes"
	"reflect"
	"testing"
)

// fuzzRoundTrip checks a decoder: no panic on any input, n within the input,
// and whatever parses encodes to bytes that parse to the same value
// (x/net's FuzzUnpackPack idea). Seeds come from the golden frames and the
// committed corpus under testdata/fuzz.
// reserved lists the offsets of RSV bytes, which decoders ignore.
func fuzzRoundTrip[T appender](f *testing.F, parse func([]byte) (T, int, error), reserved ...int) {
	for _, tc := range goldenCases() {
		golden := unhex(f, tc.golden)
		if _, _, err := parse(golden); err == nil {
			f.Add(golden)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, n, err := parse(b)
		if err != nil {
			return
		}
		if n <= 0 || n > len(b) {
			t.Fatalf("parse used %d of %d bytes", n, len(b))
		}
		enc, err := v.AppendTo(nil)
		if err != nil {
			t.Fatalf("parsed %#v does not encode: %v", v, err)
		}
		v2, n2, err := parse(enc)
		if err != nil || n2 != len(enc) || !reflect.DeepEqual(v, v2) {
			t.Fatalf("round trip: %#v -> % x -> %#v, %d, %v", v, enc, v2, n2, err)
		}
		// Everything but the reserved bytes is carried over exactly.
		if !bytes.Equal(maskReserved(enc, reserved), maskReserved(b[:n], reserved)) {
			t.Fatalf("re-encoded % x differs from input % x", enc, b[:n])
		}
	})
}

func maskReserved(b []byte, reserved []int) []byte {
	c := bytes.Clone(b)
	for _, i := range reserved {
		c[i] = 0
	}
	return c
}

func FuzzParseGreeting(f *testing.F)        { fuzzRoundTrip(f, ParseGreeting) }
func FuzzParseMethodSelection(f *testing.F) { fuzzRoundTrip(f, ParseMethodSelection) }
func FuzzParseUserPassRequest(f *testing.F) { fuzzRoundTrip(f, ParseUserPassRequest) }
func FuzzParseUserPassStatus(f *testing.F)  { fuzzRoundTrip(f, ParseUserPassStatus) }
func FuzzParseRequest(f *testing.F)         { fuzzRoundTrip(f, ParseRequest, 2) }
func FuzzParseReply(f *testing.F)           { fuzzRoundTrip(f, ParseReply, 2) }
func FuzzParseUDPHeader(f *testing.F)       { fuzzRoundTrip(f, ParseUDPHeader, 0, 1) }
