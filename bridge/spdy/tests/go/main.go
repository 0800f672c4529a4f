// spdy-interop checks fleetlet-spdy against the SPDY framer Kubernetes itself uses
// (github.com/moby/spdystream/spdy).
//
//	go run . write > frames.bin   writes a fixed session of frames
//	go run . read < frames.bin    prints each frame it reads, one line per frame
package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"

	"github.com/moby/spdystream/spdy"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: spdy-interop write|read")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "write":
		err = write(os.Stdout)
	case "read":
		err = read(bufio.NewReader(os.Stdin), os.Stdout)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// write sends what an apiserver sends a kubelet for `kubectl exec -i`: settings, one
// stream per channel (each a header block on the shared zlib stream), data, a ping.
func write(w io.Writer) error {
	f, err := spdy.NewFramer(w, nil)
	if err != nil {
		return err
	}
	frames := []spdy.Frame{
		&spdy.SettingsFrame{FlagIdValues: []spdy.SettingsFlagIdValue{{Id: spdy.SettingsInitialWindowSize, Value: 65536}}},
		&spdy.SynStreamFrame{StreamId: 1, Headers: http.Header{"Streamtype": {"error"}}},
		&spdy.SynStreamFrame{StreamId: 3, Headers: http.Header{"Streamtype": {"stdin"}}},
		&spdy.SynStreamFrame{StreamId: 5, Priority: 2, Headers: http.Header{"Streamtype": {"stdout"}, "X-Multi": {"a", "b"}}},
		&spdy.DataFrame{StreamId: 3, Data: []byte("hello\n")},
		&spdy.DataFrame{StreamId: 3, Flags: spdy.DataFlagFin},
		&spdy.PingFrame{Id: 7},
		&spdy.WindowUpdateFrame{StreamId: 5, DeltaWindowSize: 1024},
		&spdy.RstStreamFrame{StreamId: 1, Status: spdy.Cancel},
		&spdy.GoAwayFrame{LastGoodStreamId: 5, Status: spdy.GoAwayOK},
	}
	for _, fr := range frames {
		if err := f.WriteFrame(fr); err != nil {
			return err
		}
	}
	return nil
}

// read prints every frame: its kind, stream and, for header frames, the sorted headers.
func read(r io.Reader, w io.Writer) error {
	f, err := spdy.NewFramer(nil, r)
	if err != nil {
		return err
	}
	for {
		fr, err := f.ReadFrame()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		switch fr := fr.(type) {
		case *spdy.SynStreamFrame:
			fmt.Fprintf(w, "SYN_STREAM %d fin=%t %s\n", fr.StreamId, fr.CFHeader.Flags&spdy.ControlFlagFin != 0, headers(fr.Headers))
		case *spdy.SynReplyFrame:
			fmt.Fprintf(w, "SYN_REPLY %d fin=%t %s\n", fr.StreamId, fr.CFHeader.Flags&spdy.ControlFlagFin != 0, headers(fr.Headers))
		case *spdy.HeadersFrame:
			fmt.Fprintf(w, "HEADERS %d %s\n", fr.StreamId, headers(fr.Headers))
		case *spdy.DataFrame:
			fmt.Fprintf(w, "DATA %d fin=%t %q\n", fr.StreamId, fr.Flags&spdy.DataFlagFin != 0, fr.Data)
		case *spdy.RstStreamFrame:
			fmt.Fprintf(w, "RST_STREAM %d %d\n", fr.StreamId, fr.Status)
		case *spdy.PingFrame:
			fmt.Fprintf(w, "PING %d\n", fr.Id)
		case *spdy.GoAwayFrame:
			fmt.Fprintf(w, "GOAWAY %d %d\n", fr.LastGoodStreamId, fr.Status)
		case *spdy.WindowUpdateFrame:
			fmt.Fprintf(w, "WINDOW_UPDATE %d %d\n", fr.StreamId, fr.DeltaWindowSize)
		case *spdy.SettingsFrame:
			fmt.Fprintf(w, "SETTINGS %v\n", fr.FlagIdValues)
		default:
			fmt.Fprintf(w, "OTHER %T\n", fr)
		}
	}
}

func headers(h http.Header) string {
	var out []string
	for k, vs := range h {
		out = append(out, strings.ToLower(k)+"="+strings.Join(vs, ","))
	}
	sort.Strings(out)
	return strings.Join(out, ";")
}
