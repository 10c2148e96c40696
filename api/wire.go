package api

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"strconv"
)

// DefaultMaxDepth is how deeply a value may nest (a scalar is 0, a list of scalars 1),
// unless configured: deeper is E008002. A request body may nest that much more than its
// values hold (the body, data, an item), and is refused as a bad request beyond.
const DefaultMaxDepth = 32

// bodyDepthSlack is how much deeper than a value a body nests: body, data, item.
const bodyDepthSlack = 3

var errTooDeep = errors.New("nested too deeply")

// jsonDepth returns how deeply the JSON text b nests, stopping as soon as it passes
// limit (then it returns errTooDeep). It reads b once, with no recursion, so that no
// input can exhaust the stack or cost more than its length; b need not be valid JSON
// (the JSON decoder judges that afterwards).
func jsonDepth(b []byte, limit int) (int, error) {
	depth, deepest := 0, 0
	inString, escaped := false, false
	for _, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			depth++
			if depth > deepest {
				deepest = depth
				if deepest > limit {
					return deepest, errTooDeep
				}
			}
		case c == ']' || c == '}':
			depth--
		}
	}
	return deepest, nil
}

// msgpackToJSON turns a msgpack body into the equivalent JSON text, iteratively: no
// input can exhaust the stack, and every length is checked against the bytes left
// before anything is allocated for it. Nesting deeper than maxDepth is errTooDeep.
// Strings are copied byte for byte (invalid UTF-8 included, for the JSON reader to
// refuse as it refuses it in JSON); binary becomes a base64 string, as encoding/json
// writes []byte; extension types (timestamps included) and non-string map keys are
// refused.
func msgpackToJSON(b []byte, maxDepth int) ([]byte, error) {
	type frame struct {
		left  int  // items (for a map: keys plus values) still to read
		isMap bool // a map: even positions are keys
		n     int  // items read so far
	}
	out := make([]byte, 0, len(b)+len(b)/2)
	var stack []frame
	p := 0
	need := func(n int) error {
		if n < 0 || len(b)-p < n {
			return errors.New("truncated msgpack")
		}
		return nil
	}
	readUint := func(size int) (uint64, error) {
		if err := need(size); err != nil {
			return 0, err
		}
		var v uint64
		switch size {
		case 1:
			v = uint64(b[p])
		case 2:
			v = uint64(binary.BigEndian.Uint16(b[p:]))
		case 4:
			v = uint64(binary.BigEndian.Uint32(b[p:]))
		case 8:
			v = binary.BigEndian.Uint64(b[p:])
		}
		p += size
		return v, nil
	}
	for {
		// Separators and map keys: what the enclosing container expects next.
		if len(stack) > 0 {
			top := &stack[len(stack)-1]
			if top.left == 0 {
				if top.isMap {
					out = append(out, '}')
				} else {
					out = append(out, ']')
				}
				stack = stack[:len(stack)-1]
				if len(stack) == 0 {
					break
				}
				continue
			}
			if top.n > 0 {
				if top.isMap && top.n%2 == 1 {
					out = append(out, ':')
				} else {
					out = append(out, ',')
				}
			}
			top.left--
			top.n++
			if top.isMap && top.n%2 == 1 && (p >= len(b) || !isMsgpackStr(b[p])) {
				return nil, errors.New("a map key is not a string")
			}
		} else if p > 0 {
			break
		}
		if err := need(1); err != nil {
			return nil, err
		}
		c := b[p]
		p++
		var err error
		switch {
		case c <= 0x7f:
			out = strconv.AppendUint(out, uint64(c), 10)
		case c >= 0xe0:
			out = strconv.AppendInt(out, int64(int8(c)), 10)
		case c >= 0x80 && c <= 0x8f, c >= 0x90 && c <= 0x9f, c == 0xdc, c == 0xdd, c == 0xde, c == 0xdf:
			var n uint64
			isMap := c <= 0x8f || c == 0xde || c == 0xdf
			switch {
			case c <= 0x8f:
				n = uint64(c & 0x0f)
			case c <= 0x9f:
				n = uint64(c & 0x0f)
			case c == 0xdc || c == 0xde:
				n, err = readUint(2)
			default:
				n, err = readUint(4)
			}
			if err != nil {
				return nil, err
			}
			items := n
			if isMap {
				items = 2 * n
			}
			// Every item takes at least one byte: a count the rest cannot hold is a lie.
			if items > uint64(len(b)-p) {
				return nil, errors.New("a msgpack container claims more items than the body holds")
			}
			if len(stack)+1 > maxDepth {
				return nil, errTooDeep
			}
			if isMap {
				out = append(out, '{')
			} else {
				out = append(out, '[')
			}
			stack = append(stack, frame{left: int(items), isMap: isMap})
			continue
		case c >= 0xa0 && c <= 0xbf, c == 0xd9, c == 0xda, c == 0xdb:
			var n uint64
			switch c {
			case 0xd9:
				n, err = readUint(1)
			case 0xda:
				n, err = readUint(2)
			case 0xdb:
				n, err = readUint(4)
			default:
				n = uint64(c & 0x1f)
			}
			if err == nil {
				err = need(int(min(n, math.MaxInt32)))
			}
			if err != nil {
				return nil, err
			}
			out = appendJSONString(out, b[p:p+int(n)])
			p += int(n)
		case c == 0xc4 || c == 0xc5 || c == 0xc6:
			n, err := readUint(1 << (c - 0xc4))
			if err == nil {
				err = need(int(min(n, math.MaxInt32)))
			}
			if err != nil {
				return nil, err
			}
			out = append(out, '"')
			out = base64.StdEncoding.AppendEncode(out, b[p:p+int(n)])
			out = append(out, '"')
			p += int(n)
		case c == 0xc0:
			out = append(out, "null"...)
		case c == 0xc2:
			out = append(out, "false"...)
		case c == 0xc3:
			out = append(out, "true"...)
		case c == 0xca || c == 0xcb:
			var f float64
			if c == 0xca {
				v, err := readUint(4)
				if err != nil {
					return nil, err
				}
				f = float64(math.Float32frombits(uint32(v)))
			} else {
				v, err := readUint(8)
				if err != nil {
					return nil, err
				}
				f = math.Float64frombits(v)
			}
			js, err := json.Marshal(f)
			if err != nil {
				return nil, errors.New("a number with no JSON form (NaN or infinity)")
			}
			out = append(out, js...)
		case c >= 0xcc && c <= 0xcf:
			v, err := readUint(1 << (c - 0xcc))
			if err != nil {
				return nil, err
			}
			out = strconv.AppendUint(out, v, 10)
		case c >= 0xd0 && c <= 0xd3:
			size := 1 << (c - 0xd0)
			v, err := readUint(size)
			if err != nil {
				return nil, err
			}
			var i int64
			switch size {
			case 1:
				i = int64(int8(v))
			case 2:
				i = int64(int16(v))
			case 4:
				i = int64(int32(v))
			default:
				i = int64(v)
			}
			out = strconv.AppendInt(out, i, 10)
		default: // 0xc1 (never used), extensions 0xc7-0xc9 and 0xd4-0xd8
			return nil, errors.New("msgpack extension types are not accepted")
		}
	}
	if p != len(b) {
		return nil, errors.New("trailing data after the msgpack body")
	}
	return out, nil
}

// isMsgpackStr reports whether a msgpack type byte starts a string.
func isMsgpackStr(c byte) bool { return c >= 0xa0 && c <= 0xbf || c == 0xd9 || c == 0xda || c == 0xdb }

// appendJSONString appends s as a JSON string, escaping what JSON requires and leaving
// every other byte as it is.
func appendJSONString(out, s []byte) []byte {
	const hex = "0123456789abcdef"
	out = append(out, '"')
	for _, c := range s {
		switch {
		case c == '"' || c == '\\':
			out = append(out, '\\', c)
		case c < 0x20:
			out = append(out, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			out = append(out, c)
		}
	}
	return append(out, '"')
}
