// gofwd: the "Newt design" row of bench/test_e2e_bench.py.
//
// One process holds a wireguard-go device (golang.zx2c4.com/wireguard/device) whose
// TUN is a gVisor netstack (gvisor.dev/gvisor/pkg/tcpip) instead of a kernel
// interface, listens on the tunnel address inside that stack and splices every
// accepted connection to a local target with io.Copy both ways: what Newt (Pangolin's
// agent) does on the far side of its tunnel.
//
// Debian 12's golang-golang.zx2c4-wireguard-dev (0.0.20220316) has no tun/netstack,
// so the glue between wireguard-go's tun.Device and gVisor's stack is written here
// (netTUN below) against golang-gvisor-gvisor-dev (20221219), the way upstream's
// tun/netstack does it: a channel link endpoint, IPv4 only, SACK on.
//
// Build (the bench does it once and caches the binary, see bench/e2ebench.py):
//
//	cd bench/gofwd && GO111MODULE=off GOPATH=/usr/share/gocode go build -o gofwd .
//
// Usage: gofwd -address IP [-port 80] [-target 127.0.0.1:80] [-mtu 1420]; the first
// stdin line is the wireguard-go UAPI "set" configuration with each newline written
// as the two characters \n (private_key=hex, listen_port, public_key, endpoint,
// allowed_ip, ...).  Prints "ready" once listening; exits when stdin closes (or on
// SIGTERM).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"gvisor.dev/gvisor/pkg/bufferv2"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// netTUN is a tun.Device whose packets go into (and come out of) a gVisor stack.
type netTUN struct {
	ep       *channel.Endpoint
	stack    *stack.Stack
	events   chan tun.Event
	incoming chan *bufferv2.View
	mtu      int
}

func newNetTUN(addr net.IP, mtu int) (*netTUN, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
		HandleLocal:        true,
	})
	t := &netTUN{
		ep:       channel.New(1024, uint32(mtu), ""),
		stack:    s,
		events:   make(chan tun.Event, 10),
		incoming: make(chan *bufferv2.View, 1024),
		mtu:      mtu,
	}
	sack := tcpip.TCPSACKEnabled(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		return nil, fmt.Errorf("SACK: %v", err)
	}
	t.ep.AddNotify(t)
	if err := s.CreateNIC(1, t.ep); err != nil {
		return nil, fmt.Errorf("CreateNIC: %v", err)
	}
	protoAddr := tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.Address(addr.To4()).WithPrefix(),
	}
	if err := s.AddProtocolAddress(1, protoAddr, stack.AddressProperties{}); err != nil {
		return nil, fmt.Errorf("AddProtocolAddress: %v", err)
	}
	s.AddRoute(tcpip.Route{Destination: header.IPv4EmptySubnet, NIC: 1})
	t.events <- tun.EventUp
	return t, nil
}

// WriteNotify: the stack queued an outgoing packet; hand it to wireguard-go's Read.
func (t *netTUN) WriteNotify() {
	pkt := t.ep.Read()
	if pkt.IsNil() {
		return
	}
	view := pkt.ToView()
	pkt.DecRef()
	t.incoming <- view
}

func (t *netTUN) File() *os.File         { return nil }
func (t *netTUN) Flush() error           { return nil }
func (t *netTUN) MTU() (int, error)      { return t.mtu, nil }
func (t *netTUN) Name() (string, error)  { return "gofwd", nil }
func (t *netTUN) Events() chan tun.Event { return t.events }
func (t *netTUN) listen(port int) (*gonet.TCPListener, error) {
	return gonet.ListenTCP(t.stack, tcpip.FullAddress{NIC: 1, Port: uint16(port)}, ipv4.ProtocolNumber)
}

func (t *netTUN) Read(buf []byte, offset int) (int, error) {
	view, ok := <-t.incoming
	if !ok {
		return 0, os.ErrClosed
	}
	n, err := view.Read(buf[offset:])
	view.Release()
	return n, err
}

func (t *netTUN) Write(buf []byte, offset int) (int, error) {
	packet := buf[offset:]
	if len(packet) == 0 || packet[0]>>4 != 4 {
		return 0, nil
	}
	pkb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: bufferv2.MakeWithData(packet)})
	t.ep.InjectInbound(header.IPv4ProtocolNumber, pkb)
	return len(buf), nil
}

func (t *netTUN) Close() error {
	t.stack.RemoveNIC(1)
	close(t.events)
	t.ep.Close()
	return nil
}

// splice copies both ways, passing each half-close on, until both directions end.
func splice(client net.Conn, target string) {
	defer client.Close()
	upstream, err := net.Dial("tcp", target)
	if err != nil {
		return
	}
	defer upstream.Close()
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(upstream, client)
		_ = upstream.(*net.TCPConn).CloseWrite()
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(client, upstream)
		_ = client.(*gonet.TCPConn).CloseWrite()
		done <- struct{}{}
	}()
	<-done
	<-done
}

func main() {
	address := flag.String("address", "", "tunnel address of this end (IPv4)")
	port := flag.Int("port", 80, "TCP port to accept on, inside the tunnel")
	target := flag.String("target", "127.0.0.1:80", "where each accepted connection goes")
	mtu := flag.Int("mtu", 1420, "tunnel MTU")
	verbose := flag.Bool("verbose", false, "wireguard-go's verbose log on stderr")
	flag.Parse()

	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "gofwd: no UAPI configuration line on stdin")
		os.Exit(2)
	}
	uapi := strings.ReplaceAll(strings.TrimSpace(line), `\n`, "\n") + "\n"

	ip := net.ParseIP(*address)
	if ip == nil || ip.To4() == nil {
		fmt.Fprintln(os.Stderr, "gofwd: -address must be an IPv4 address")
		os.Exit(2)
	}
	dev, err := newNetTUN(ip, *mtu)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gofwd:", err)
		os.Exit(1)
	}
	level := device.LogLevelError
	if *verbose {
		level = device.LogLevelVerbose
	}
	wg := device.NewDevice(dev, conn.NewDefaultBind(), device.NewLogger(level, "gofwd: "))
	if err := wg.IpcSet(uapi); err != nil {
		fmt.Fprintln(os.Stderr, "gofwd: IpcSet:", err)
		os.Exit(1)
	}
	if err := wg.Up(); err != nil {
		fmt.Fprintln(os.Stderr, "gofwd: Up:", err)
		os.Exit(1)
	}
	listener, err := dev.listen(*port)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gofwd: listen:", err)
		os.Exit(1)
	}
	ctx, stop := context.WithCancel(context.Background())
	go func() { // stdin closing (the parent went away) or a signal ends the process
		_, _ = io.Copy(io.Discard, in)
		stop()
	}()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		stop()
	}()
	go func() {
		for {
			client, err := listener.Accept()
			if err != nil {
				return
			}
			go splice(client, *target)
		}
	}()
	fmt.Println("ready")
	<-ctx.Done()
	_ = listener.Close()
	wg.Close()
}
