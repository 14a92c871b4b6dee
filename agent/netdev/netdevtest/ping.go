package netdevtest

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Ping sends ICMP echo requests to ip from inside the namespace, one a
// second, until one is answered (nil) or ctx ends. It needs no ping binary.
func (n *Netns) Ping(ctx context.Context, ip string) error {
	dst, err := netip.ParseAddr(ip)
	if err != nil || !dst.Is4() {
		return fmt.Errorf("ping %q: not an IPv4 address", ip)
	}
	return n.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err != nil {
			return fmt.Errorf("ping: raw socket: %w", err)
		}
		defer unix.Close(fd)
		tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		id := uint16(fd) ^ uint16(time.Now().UnixNano())
		sa := &unix.SockaddrInet4{Addr: dst.As4()}
		buf := make([]byte, 1500)
		for seq := uint16(1); ; seq++ {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("ping %s: no answer: %w", ip, err)
			}
			if err := unix.Sendto(fd, echoRequest(id, seq), 0, sa); err != nil {
				return fmt.Errorf("ping %s: %w", ip, err)
			}
			until := time.Now().Add(time.Second)
			for time.Now().Before(until) && ctx.Err() == nil {
				m, from, err := unix.Recvfrom(fd, buf, 0)
				if err != nil {
					continue // EAGAIN after SO_RCVTIMEO: check the clock
				}
				src, ok := from.(*unix.SockaddrInet4)
				if !ok || netip.AddrFrom4(src.Addr) != dst || m < 20 {
					continue
				}
				ihl := int(buf[0]&0x0f) * 4
				icmp := buf[ihl:m]
				if len(icmp) >= 8 && icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:]) == id {
					return nil
				}
			}
		}
	})
}

func echoRequest(id, seq uint16) []byte {
	b := make([]byte, 16)
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "otherix!")
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}
