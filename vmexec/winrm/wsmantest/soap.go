package wsmantest

import (
	"bytes"
	"crypto/rand"
	"encoding/xml"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// XML namespaces of the WS-Management shell protocol.
const (
	NSSoap     = "http://www.w3.org/2003/05/soap-envelope"
	NSAddr     = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
	NSTransfer = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
	NSWsman    = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
	NSMsWsman  = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"
	NSShell    = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
	NSFault    = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"
)

// WS-Addressing actions and URIs the server understands.
const (
	ResourceCmd = NSShell + "/cmd"

	ActionCreate  = NSTransfer + "/Create"
	ActionDelete  = NSTransfer + "/Delete"
	ActionCommand = NSShell + "/Command"
	ActionReceive = NSShell + "/Receive"
	ActionSend    = NSShell + "/Send"
	ActionSignal  = NSShell + "/Signal"
	ActionFault   = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"

	SignalTerminate = NSShell + "/signal/terminate"
	SignalCtrlC     = NSShell + "/signal/ctrl_c"
	SignalCtrlBreak = NSShell + "/signal/ctrl_break"

	StateRunning = NSShell + "/CommandState/Running"
	StateDone    = NSShell + "/CommandState/Done"

	anonymous = NSAddr + "/role/anonymous"
)

// nameValue is a wsman:Selector or wsman:Option.
type nameValue struct {
	Name  string `xml:"Name,attr"`
	Value string `xml:",chardata"`
}

type reqEnvelope struct {
	XMLName xml.Name  `xml:"http://www.w3.org/2003/05/soap-envelope Envelope"`
	Header  reqHeader `xml:"http://www.w3.org/2003/05/soap-envelope Header"`
	Body    reqBody   `xml:"http://www.w3.org/2003/05/soap-envelope Body"`
}

type reqHeader struct {
	To               string `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing To"`
	Action           string `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing Action"`
	MessageID        string `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing MessageID"`
	ResourceURI      string `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd ResourceURI"`
	MaxEnvelopeSize  string `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd MaxEnvelopeSize"`
	OperationTimeout string `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd OperationTimeout"`
	SelectorSet      struct {
		Selectors []nameValue `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd Selector"`
	} `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd SelectorSet"`
	OptionSet struct {
		Options []nameValue `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd Option"`
	} `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd OptionSet"`
}

func (h *reqHeader) selector(name string) string {
	for _, s := range h.SelectorSet.Selectors {
		if strings.EqualFold(s.Name, name) {
			return strings.TrimSpace(s.Value)
		}
	}
	return ""
}

type reqBody struct {
	Shell *struct {
		InputStreams  string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell InputStreams"`
		OutputStreams string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell OutputStreams"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Shell"`
	CommandLine *struct {
		Command   string   `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Command"`
		Arguments []string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Arguments"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell CommandLine"`
	Receive *struct {
		DesiredStream struct {
			CommandID string `xml:"CommandId,attr"`
			Streams   string `xml:",chardata"`
		} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell DesiredStream"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Receive"`
	Send *struct {
		Streams []struct {
			Name      string `xml:"Name,attr"`
			CommandID string `xml:"CommandId,attr"`
			End       string `xml:"End,attr"`
			Data      string `xml:",chardata"`
		} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Stream"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Send"`
	Signal *struct {
		CommandID string `xml:"CommandId,attr"`
		Code      string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Code"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Signal"`
}

// Fault is a WS-Management fault the server answers with HTTP 500.
type Fault struct {
	// Code is s:Sender or s:Receiver.
	Code string
	// Subcode is the qualified WS-Management subcode, such as "w:TimedOut".
	Subcode string
	// WSManCode is the numeric code of the f:WSManFault detail.
	WSManCode uint32
	// Reason is the human-readable text.
	Reason string
}

func (f *Fault) Error() string { return f.Subcode + ": " + f.Reason }

// Fault codes (the numeric values are those of Windows' WinRM service).
func faultTimedOut() *Fault {
	return &Fault{"s:Receiver", "w:TimedOut", 0x80338029,
		"The WS-Management service cannot complete the operation within the time specified in OperationTimeout."}
}

func faultShellNotFound(id string) *Fault {
	return &Fault{"s:Sender", "w:InvalidSelectors", 0x8033805B, fmt.Sprintf(
		"The request for the Windows Remote Shell with ShellId %s failed because the shell was not found on the server. Possible causes are: the specified ShellId is incorrect or the shell no longer exists on the server.", id)}
}

func faultCommandNotFound(id string) *Fault {
	return &Fault{"s:Sender", "w:InvalidSelectors", 0x8033805B, fmt.Sprintf(
		"The request for the command with CommandId %s failed because the command was not found in the shell.", id)}
}

func faultInvalid(format string, args ...any) *Fault {
	return &Fault{"s:Sender", "w:SchemaValidationError", 0x80338041, fmt.Sprintf(format, args...)}
}

func faultAction(action string) *Fault {
	return &Fault{"s:Sender", "a:ActionNotSupported", 0x80338008, fmt.Sprintf(
		"The WS-Management service cannot process the request because the action %q is not supported for this resource.", action)}
}

func faultResource(uri string) *Fault {
	return &Fault{"s:Sender", "w:DestinationUnreachable", 0x80338000, fmt.Sprintf(
		"The WS-Management service cannot process the request. The resource URI %q was not found.", uri)}
}

func faultEncodingLimit(limit int) *Fault {
	return &Fault{"s:Sender", "w:EncodingLimit", 0x80338033, fmt.Sprintf(
		"The WS-Management service cannot process the request because the request is larger than MaxEnvelopeSize (%d bytes).", limit)}
}

func faultInternal(format string, args ...any) *Fault {
	return &Fault{"s:Receiver", "w:InternalError", 0x80338006, fmt.Sprintf(format, args...)}
}

func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("wsmantest: crypto/rand: " + err.Error())
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%X-%X-%X-%X-%X", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func esc(s string) string {
	var b bytes.Buffer
	xml.EscapeText(&b, []byte(s))
	return b.String()
}

// writeEnvelope writes a SOAP response with the given action and body XML.
func writeEnvelope(w http.ResponseWriter, status int, action, relatesTo, body string) {
	var b strings.Builder
	b.WriteString(`<?xml version="1.0" encoding="UTF-8"?>` + "\n")
	b.WriteString(`<s:Envelope xml:lang="en-US" xmlns:s="` + NSSoap + `" xmlns:a="` + NSAddr +
		`" xmlns:x="` + NSTransfer + `" xmlns:w="` + NSWsman + `" xmlns:p="` + NSMsWsman +
		`" xmlns:rsp="` + NSShell + `" xmlns:f="` + NSFault + `">`)
	b.WriteString(`<s:Header><a:Action>` + esc(action) + `</a:Action><a:MessageID>uuid:` + newUUID() +
		`</a:MessageID><a:To>` + anonymous + `</a:To>`)
	if relatesTo != "" {
		b.WriteString(`<a:RelatesTo>` + esc(relatesTo) + `</a:RelatesTo>`)
	}
	b.WriteString(`</s:Header><s:Body>` + body + `</s:Body></s:Envelope>`)
	w.Header().Set("Content-Type", "application/soap+xml;charset=UTF-8")
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(status)
	w.Write([]byte(b.String()))
}

func writeFault(w http.ResponseWriter, relatesTo string, f *Fault) {
	body := `<s:Fault><s:Code><s:Value>` + esc(f.Code) + `</s:Value><s:Subcode><s:Value>` + esc(f.Subcode) +
		`</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">` + esc(f.Reason) +
		`</s:Text></s:Reason><s:Detail><f:WSManFault Code="` + strconv.FormatUint(uint64(f.WSManCode), 10) +
		`" Machine="wsmantest"><f:Message>` + esc(f.Reason) + `</f:Message></f:WSManFault></s:Detail></s:Fault>`
	writeEnvelope(w, http.StatusInternalServerError, ActionFault, relatesTo, body)
}

var durationRE = regexp.MustCompile(`^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$`)

// parseDuration parses the xs:duration subset WS-Management uses ("PT60S",
// "PT1M30.5S", "P0DT0H5M0S").
func parseDuration(s string) (time.Duration, bool) {
	m := durationRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil || s == "P" || strings.HasSuffix(s, "T") {
		return 0, false
	}
	var d time.Duration
	for i, unit := range []time.Duration{24 * time.Hour, time.Hour, time.Minute} {
		if m[i+1] != "" {
			n, err := strconv.Atoi(m[i+1])
			if err != nil {
				return 0, false
			}
			d += time.Duration(n) * unit
		}
	}
	if m[4] != "" {
		f, err := strconv.ParseFloat(m[4], 64)
		if err != nil {
			return 0, false
		}
		d += time.Duration(f * float64(time.Second))
	}
	return d, true
}
